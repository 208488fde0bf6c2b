"""pipeline/plan.py: the pure arithmetic is the trainer's, number for number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import plan
from gpt.model import GPT, GPTConfig
from gpt.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]

SHAPES = [  # (depth, vocab, seq_len): tiny and odd ones, the presets' and the reference's
    (1, 512, 16), (2, 1024, 128), (3, 777, 100), (4, 4096, 256), (5, 1000, 64), (7, 50257, 1024),
    (11, 32768, 512), (12, 65536, 2048), (13, 3001, 333), (20, 65536, 2048), (25, 65536, 2048), (26, 65536, 2048),
]


def meta_model(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def assert_shape_is_the_models(shape: plan.ModelShape, model: GPT):
    c = model.config
    named = dict(model.named_parameters())
    assert (shape.width, shape.heads, shape.kv_heads, shape.head_dim) == (c.n_embd, c.n_head, c.n_kv_head, c.head_dim)
    assert (shape.depth, shape.vocab_size, shape.seq_len) == (c.n_layer, c.vocab_size, c.sequence_len)
    assert shape.params == model.num_params()
    assert shape.scaling_params == model.num_scaling_params()
    assert shape.linear_params == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shape.flops_per_token == model.flops_per_token()
    assert shape.adamw_shapes == tuple(tuple(named[n].shape) for n in plan.ADAMW_PARAMETERS)
    # Muon's groups as the optimizer forms them: one per shape of the matrices inside the blocks.
    optimizer = build_optimizer(model)
    groups = {tuple(g["params"][0].shape): len(g["params"]) for g in optimizer.param_groups if g["kind"] == "muon"}
    assert shape.muon_shapes == tuple(sorted(groups.items()))
    assert {n for g in optimizer.param_groups if g["kind"] == "adamw" for n in g["names"]} == set(plan.ADAMW_PARAMETERS)


@pytest.mark.parametrize("depth, vocab, seq", SHAPES)
def test_model_shape_is_the_gpt_base_train_builds(depth, vocab, seq):
    model = meta_model(GPTConfig.from_depth(depth, vocab, sequence_len=seq))
    assert_shape_is_the_models(plan.model_shape(depth, vocab, seq), model)
    assert plan.parameter_shapes(vocab, depth, model.config.n_embd, model.config.n_kv_head * model.config.head_dim) == \
        {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert list(plan.parameter_shapes(vocab, depth, 128, 128)) == [name for name, _ in model.named_parameters()]  # same order


@pytest.mark.parametrize("depth, vocab, seq, options", [
    (2, 512, 64, dict(aspect_ratio=32, head_dim=64)),            # the base_train test model
    (6, 1000, 2048, dict(window_pattern="SSSL")),                 # short windows: fewer attention FLOPs
    (9, 2000, 1000, dict(window_pattern="SL", n_kv_head=1)),      # grouped-query attention: narrower k and v
    (20, 65536, 2048, dict(n_kv_head=5, window_pattern="S")),
    (3, 300, 48, dict(aspect_ratio=7, head_dim=6)),               # width rounded up to whole heads
])
def test_model_shape_follows_every_option_of_the_family(depth, vocab, seq, options):
    model = meta_model(GPTConfig.from_depth(depth, vocab, sequence_len=seq, **options))
    assert_shape_is_the_models(plan.model_shape(depth, vocab, seq, **options), model)


def test_the_defaults_are_base_trains():
    from trainer import base_train

    args = base_train.parse_args(["--run-dir", "x"])
    assert (args.aspect_ratio, args.head_dim, args.n_kv_head, args.window_pattern) == \
        (plan.ASPECT_RATIO, plan.HEAD_DIM, None, plan.WINDOW_PATTERN)
    assert plan.model_shape(20, 65536, 2048).params == 560_988_160


def test_width_and_heads_and_their_refusals():
    assert plan.width_and_heads(25) == (1664, 13, 13)  # 1600 rounded up to whole 128-wide heads
    assert plan.width_and_heads(20, n_kv_head=5) == (1280, 10, 5)
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        plan.width_and_heads(0)
    with pytest.raises(ValueError, match="head_dim a positive even number"):
        plan.width_and_heads(4, head_dim=3)
    with pytest.raises(ValueError, match=r"pick one of \[1, 2, 5, 10\]"):
        plan.width_and_heads(20, n_kv_head=3)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        GPTConfig.from_depth(0, 100)  # the model says it in plan's words


def test_windows():
    assert plan.short_window(2048) == 512 and plan.short_window(1000) == 256 and plan.short_window(64) == 16
    assert plan.window_sizes("SSSL", 6, 2048) == [512, 512, 512, 2048, 512, 2048]
    assert plan.window_sizes("L", 3, 128) == [128, 128, 128]


@pytest.mark.parametrize("total, device, seq, world, accum", [(2048, 8, 256, 1, 1), (524288, 32, 2048, 8, 1),
                                                              (524288, 16, 2048, 1, 16), (8192, 4, 128, 2, 8)])
def test_grad_accumulation(total, device, seq, world, accum):
    assert plan.grad_accumulation(total, device, seq, world) == accum
    assert plan.batch_mismatch(total, device, seq, world) is None


def test_one_message_for_a_batch_that_does_not_divide():
    fields = plan.batch_mismatch(1000, 1, 256, 1)
    assert fields == ("1000 tokens is not a multiple of max_seq_len x device_batch_size x GPUs = 256; "
                      "use e.g. total_batch_size 768 or 1024, or change device_batch_size")
    flags = plan.batch_mismatch(1000, 1, 256, 1, flags=True)
    assert flags == ("1000 tokens is not a multiple of --max-seq-len x --device-batch-size x GPUs = 256; "
                     "use e.g. --total-batch-size 768 or 1024, or change --device-batch-size")
    assert "use e.g. total_batch_size 2048," in plan.batch_mismatch(1000, 8, 256, 1)  # below one micro-step
    with pytest.raises(ValueError) as err:
        plan.grad_accumulation(1000, 1, 256, 1, flags=True)
    assert str(err.value) == flags


def test_horizon():
    # (num_iterations, target_flops, ratio, total batch, FLOPs/token, scaling params) -> steps, basis
    assert plan.horizon(60, -1.0, 20.0, 512, 1e6, 10**6) == (60, "num-iterations")
    assert plan.horizon(-1, 1e12, 20.0, 1000, 1e6, 10**6) == (1000, "target-flops 1e+12")
    assert plan.horizon(-1, -1.0, 20.0, 1000, 1e6, 10**6) == (20_000, "ratio 20.0 tokens/param")
    assert plan.horizon(-1, -1.0, 0.001, 10**9, 1e6, 10) == (1, "ratio 0.001 tokens/param")  # at least one step
    shape = plan.model_shape(20, 65536, 2048)
    steps, _ = plan.horizon(-1, -1.0, 20.0, 524288, shape.flops_per_token, shape.scaling_params)
    assert steps == round(20 * shape.scaling_params / 524288) == 18200  # the speedrun's 18,200 steps


def test_horizon_problems():
    assert plan.horizon_problem(-1, -1.0, 20.0) is None and plan.horizon_problem(5, -1.0, 0.0) is None
    assert plan.horizon_problem(-1, 1e18, 0.0) is None
    assert plan.horizon_problem(0, -1.0, 20.0) == \
        "0 steps would train nothing; give a number of steps, or -1 to derive them from target_param_data_ratio"
    assert "--target-flops or --target-param-data-ratio" in plan.horizon_problem(0, -1.0, 20.0, flags=True)
    assert "neither is positive" in plan.horizon_problem(-1, -1.0, 0.0, flags=True)


def test_plan_imports_no_torch():
    code = "import sys, pipeline.plan, pipeline.hardware; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
