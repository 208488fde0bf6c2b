"""MuonAdamW: AdamW equals torch's, Newton-Schulz orthogonalises, schedules, sharded state, 1 vs 2 ranks."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import REPO
from gpt.model import GPTConfig, build_model
from gpt.optim import (MuonAdamW, build_optimizer, lr_multiplier, muon_momentum, muon_update_, orthogonalize,
                           weight_decay_at)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


TINY = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def make(config=TINY, seed=0):
    torch.manual_seed(seed)
    return build_model(config, "cpu")


def fake_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_groups_learning_rates_and_coverage():
    model = make()
    opt = build_optimizer(model, matrix_lr=0.03, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.1)
    scale = (64 / 768) ** -0.5
    by_name = {n: g for g in opt.param_groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert by_name["transformer.wte.weight"]["kind"] == "adamw"
    assert by_name["transformer.wte.weight"]["lr"] == pytest.approx(0.2 * scale)
    assert by_name["lm_head.weight"]["lr"] == pytest.approx(0.004 * scale)
    assert by_name["lm_head.weight"]["weight_decay"] == 0.0
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    # GQA: q/proj (64x64), k/v (32x64), fc (256x64), mlp proj (64x256): one group per shape
    assert sorted(tuple(g["params"][0].shape) for g in muon) == [(32, 64), (64, 64), (64, 256), (256, 64)]
    assert all(g["lr"] == 0.03 and g["weight_decay"] == 0.1 for g in muon)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    opt.set_muon_momentum(0.9)
    assert all(g["momentum"] == 0.9 for g in muon)


def test_adamw_part_equals_torch_adamw():
    model = make()
    opt = build_optimizer(model)
    for g in opt.param_groups:
        if g["kind"] == "adamw":
            g["weight_decay"] = 0.05  # exercise the decoupled decay too
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref = torch.optim.AdamW(
        [dict(params=[ref_params[n]], lr=g["lr"]) for g in opt.param_groups if g["kind"] == "adamw" for n in g["names"]],
        betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05, foreach=False)
    for step in range(5):
        fake_grads(model, step)
        for n, p in model.named_parameters():
            ref_params[n].grad = p.grad.clone()
        lrm = lr_multiplier(step, 5, warmup_steps=2)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
        for g, rg in zip([g for g in opt.param_groups if g["kind"] == "adamw"], ref.param_groups):
            rg["lr"] = g["lr"]
        opt.step()
        ref.step()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        torch.testing.assert_close(dict(model.named_parameters())[name], ref_params[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(64, 64), (32, 128), (128, 32), (4, 48, 96)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    # A spectrum spread over two decades (condition number 100). Directions weaker than ~1/500 of the
    # Frobenius norm stay short after 5 steps, which is fine for gradients, so the test does not use them.
    gen = torch.Generator().manual_seed(0)
    k = min(shape[-2:])
    U, _ = torch.linalg.qr(torch.randn(*shape[:-1], k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], k, generator=gen))
    G = U @ torch.diag_embed(torch.logspace(-2, 0, k).expand(*shape[:-2], k)) @ V.mT
    X = orthogonalize(G)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.6 and s.max() < 1.3  # the quintic trades exactness for speed: ~[0.68, 1.14] plus bf16 noise
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonal factor: X points the same way
    cos = (X.float() * polar).sum(dim=(-2, -1)) / (X.float().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.97
    Y = orthogonalize(G * 1000.0).float()  # scale-free: only the direction of the gradient matters (up to bf16 noise)
    assert ((Y * X.float()).sum() / (Y.norm() * X.float().norm())).item() > 0.99


def test_muon_step_by_hand():
    p = torch.randn(1, 32, 64)
    g = torch.randn(1, 32, 64)
    buf = torch.zeros(1, 32, 64)
    before = p.clone()
    muon_update_(p, g, buf, lr=0.1, momentum=0.9, weight_decay=0.5)
    torch.testing.assert_close(buf, 0.1 * g)
    nesterov = g.lerp(buf, 0.9)
    expected = before * (1 - 0.1 * 0.5) - 0.1 * orthogonalize(nesterov).float()
    torch.testing.assert_close(p, expected)
    # tall matrices: orthogonal 128x32 has RMS entry 1/sqrt(128), not 1/sqrt(32), so the step is x sqrt(128/32)
    tall, g, buf = torch.zeros(1, 128, 32), torch.randn(1, 128, 32), torch.zeros(1, 128, 32)
    muon_update_(tall, g, buf, lr=0.1, momentum=0.9, weight_decay=0.0)
    torch.testing.assert_close(tall, -0.1 * 2 * orthogonalize(g.lerp(buf, 0.9)).float())


def test_schedules_at_their_boundaries():
    assert lr_multiplier(0, 100) == 1.0
    assert lr_multiplier(80, 100) == 1.0  # the warmdown is the last 20 steps
    assert lr_multiplier(90, 100) == pytest.approx(0.5)
    assert lr_multiplier(99, 100) == pytest.approx(0.05)
    assert lr_multiplier(100, 100) == 0.0
    assert lr_multiplier(100, 100, final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(90, 100, final_lr_frac=0.1) == pytest.approx(0.55)
    assert lr_multiplier(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, warmup_steps=10) == 1.0
    assert lr_multiplier(50, 100, warmdown_ratio=0.0) == 1.0 and lr_multiplier(100, 100, warmdown_ratio=0.0) == 1.0
    # overlapping warmup and warmdown (tiny runs): the smaller factor wins
    assert lr_multiplier(3, 4, warmup_steps=10, warmdown_ratio=0.5) == pytest.approx(0.4)
    assert lr_multiplier(3, 4, warmup_steps=4, warmdown_ratio=0.5) == pytest.approx(0.5)
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(5, warmup_steps=0) == 0.95
    assert weight_decay_at(0, 100, 0.2) == 0.2
    assert weight_decay_at(50, 100, 0.2) == pytest.approx(0.1)
    assert weight_decay_at(100, 100, 0.2) == 0.0 and weight_decay_at(150, 100, 0.2) == 0.0


def test_a_tiny_model_overfits_one_batch():
    model = make()
    opt = build_optimizer(model)
    x = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    first = None
    for step in range(60):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for g in opt.param_groups:
            if g["kind"] == "muon":
                g["momentum"] = muon_momentum(step)
        opt.step()
        model.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
    assert first == pytest.approx(math.log(64), abs=1e-4)
    assert loss.item() < 0.1


def test_shard_state_round_trip_through_safetensors_continues_identically(tmp_path):
    model = make()
    opt = build_optimizer(model, weight_decay=0.1)
    x = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(3))
    fresh = opt.shard_state()  # before any step: the zeros a first step starts from
    assert all(not t.any() for k, t in fresh.items() if k not in ("world_size", "rank"))
    for _ in range(3):
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    state = opt.shard_state()
    ptrs = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(ptrs)) == len(ptrs) and all(t.is_contiguous() for t in state.values())
    assert state["adamw.lm_head.weight.step"].item() == 3 and state["world_size"].item() == 1
    assert "muon.transformer.h.1.mlp.c_fc.weight.momentum_buffer" in state
    save_file(state, str(tmp_path / "optim.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))

    resumed = make(seed=99)
    resumed.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    opt2 = build_optimizer(resumed, weight_decay=0.1)
    opt2.load_shard_state(load_file(str(tmp_path / "optim.safetensors")))
    for m, o in ((model, opt), (resumed, opt2)):
        for _ in range(2):
            m(x[:, :-1], x[:, 1:]).backward()
            o.step()
            m.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_mismatched_state_is_refused_with_a_clear_error():
    opt = build_optimizer(make())
    state = opt.shard_state()
    other = build_optimizer(make(GPTConfig(sequence_len=32, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)))
    with pytest.raises(ValueError, match="missing.*different depth"):
        other.load_shard_state(state)
    with pytest.raises(ValueError, match="saved by a run with 2 ranks, this run has 1"):
        opt.load_shard_state({**state, "world_size": torch.tensor(2)})
    with pytest.raises(ValueError, match="rank 1 was given to rank 0"):
        opt.load_shard_state({**state, "rank": torch.tensor(1)})
    wider = build_optimizer(make(GPTConfig(sequence_len=32, vocab_size=80, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)))
    with pytest.raises(ValueError, match=r"wrong shapes.*saved \(64, 64\), expected \(80, 64\)"):
        wider.load_shard_state(state)
    with pytest.raises(ValueError, match="kind 'muon' or 'adamw'"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)])


# ---- distributed (real torchrun, gloo on CPU) -----------------------------------------------------------

WORKER = REPO / "tests" / "dist_optim_worker.py"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, torch_one_thread):
    """The worker on 2 ranks under torchrun and, meanwhile, on 1 rank in this process; their output folders."""
    from tests import dist_optim_worker

    one, two = tmp_path_factory.mktemp("world1"), tmp_path_factory.mktemp("world2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # --standalone rendezvous binds a free port itself: no clash with tests running beside it
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(WORKER), str(two)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        dist_optim_worker.run_all(str(one))  # one thread, like the ranks: same kernels, same bits
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    return one, two


def _size(state):
    # elements of moments and momentum buffers (step counters and the layout record are per rank anyway)
    return sum(t.numel() for k, t in state.items() if k not in ("world_size", "rank") and not k.endswith(".step"))


@pytest.mark.parametrize("scenario", ["sliced", "replicated"])
def test_two_ranks_equal_one_rank_on_the_whole_batch(worlds, scenario):
    one, two = worlds
    a = load_file(str(one / f"{scenario}_params.safetensors"))
    b = load_file(str(two / f"{scenario}_params.safetensors"))
    assert set(a) == set(b)
    for name in a:
        # Same micro-batches, gradients averaged across ranks vs accumulated on one: the same bits.
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7, msg=name)
    # One batch of 4 instead of 2 micro-batches of 2 rounds differently, and bf16 Newton-Schulz magnifies
    # that in near-degenerate directions: equal only loosely (a wrong average would be far off).
    full = load_file(str(one / f"{scenario}_full_params.safetensors"))
    diff = torch.cat([(full[n] - a[n]).flatten() for n in a]).norm()
    assert diff / torch.cat([a[n].flatten() for n in a]).norm() < 1e-2
    # resuming from a saved shard inside each rank continued bit for bit
    for path in list(one.glob(f"{scenario}_rank*.json")) + list(two.glob(f"{scenario}_rank*.json")):
        assert "resume_max_diff\": 0.0" in path.read_text(), path


def test_each_rank_holds_only_its_share_of_the_state(worlds):
    one, two = worlds
    full = load_file(str(one / "sliced_optim_rank0.safetensors"))
    r0 = load_file(str(two / "sliced_optim_rank0.safetensors"))
    r1 = load_file(str(two / "sliced_optim_rank1.safetensors"))
    assert r0["world_size"].item() == r1["world_size"].item() == 2 and (r0["rank"].item(), r1["rank"].item()) == (0, 1)
    assert _size(r0) + _size(r1) == _size(full)  # nothing replicated when every param can be sliced
    # Muon: each matrix's momentum lives on exactly one rank, with the 1-rank value (3 c_fc over 2 ranks: 2 + 1)
    muon0 = {k for k in r0 if k.startswith("muon.")}
    muon1 = {k for k in r1 if k.startswith("muon.")}
    assert not muon0 & muon1 and muon0 | muon1 == {k for k in full if k.startswith("muon.")}
    assert sum("mlp.c_fc" in k for k in muon0) == 2 and sum("mlp.c_fc" in k for k in muon1) == 1
    for k in muon0 | muon1:
        torch.testing.assert_close((r0 if k in r0 else r1)[k], full[k], rtol=0, atol=1e-7)
    # AdamW: rows 0..63 on rank 0, 64..127 on rank 1
    for k in ("adamw.transformer.wte.weight.exp_avg", "adamw.lm_head.weight.exp_avg_sq"):
        assert r0[k].shape == (64, 64)
        torch.testing.assert_close(torch.cat([r0[k], r1[k]]), full[k], rtol=0, atol=1e-7)
    # a vocabulary of 127 rows cannot be split in two: those moments are replicated on both ranks
    rep = [load_file(str(two / f"replicated_optim_rank{r}.safetensors")) for r in (0, 1)]
    assert rep[0]["adamw.transformer.wte.weight.exp_avg"].shape == rep[1]["adamw.transformer.wte.weight.exp_avg"].shape == (127, 64)


# ---- re-sharding: state saved on W ranks loaded on W' (resume on another number of GPUs) --------------------

def _as_rank(monkeypatch, world, rank):
    """Make this process's optimizer act as `rank` of `world` (layout only: nothing here steps)."""
    from gpt import optim

    monkeypatch.setattr(optim, "_world", lambda: (world, rank))


def _expected_shard(full, opt, world, rank):
    """What `rank` of `world` holds, cut by hand from the whole state a 1-rank run holds."""
    out = {"world_size": torch.tensor(world), "rank": torch.tensor(rank)}
    for g in opt.param_groups:
        if g["kind"] == "adamw":
            for p, name in zip(g["params"], g["names"]):
                for key in ("exp_avg", "exp_avg_sq"):
                    t = full[f"adamw.{name}.{key}"]
                    sliced = p.numel() >= 1024 and p.size(0) % world == 0
                    out[f"adamw.{name}.{key}"] = t.chunk(world)[rank] if sliced else t
                out[f"adamw.{name}.step"] = full[f"adamw.{name}.step"]
        else:
            per = -(-len(g["names"]) // world)
            for name in g["names"][rank * per:(rank + 1) * per]:
                out[f"muon.{name}.momentum_buffer"] = full[f"muon.{name}.momentum_buffer"]
    return out


def _assert_same_state(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=0, atol=1e-7, msg=k)


@pytest.mark.parametrize("scenario", ["sliced", "replicated"])
def test_state_of_two_ranks_loads_on_one_rank_as_the_one_rank_run_holds_it(worlds, scenario):
    from contextlib import ExitStack

    from safetensors import safe_open

    from tests.dist_optim_worker import SCENARIOS

    one, two = worlds
    opt = build_optimizer(build_model(SCENARIOS[scenario], "cpu"))
    with ExitStack() as files:  # as a resume opens them: only the rows and matrices wanted are read
        opt.load_resharded_state([files.enter_context(safe_open(str(two / f"{scenario}_optim_rank{r}.safetensors"), framework="pt"))
                                  for r in (0, 1)])
    _assert_same_state(opt.shard_state(), load_file(str(one / f"{scenario}_optim_rank0.safetensors")))
    # and under torchrun, every rank loading all shards on the same 2 ranks got its own shard back exactly
    for r in (0, 1):
        assert json.loads((two / f"{scenario}_reshard_rank{r}.json").read_text()) == {"max_diff": 0.0}


@pytest.mark.parametrize("scenario", ["sliced", "replicated"])
def test_state_of_one_rank_loads_on_two_ranks_as_the_two_rank_run_holds_it(worlds, scenario, monkeypatch):
    from tests.dist_optim_worker import SCENARIOS

    one, two = worlds
    full = load_file(str(one / f"{scenario}_optim_rank0.safetensors"))
    for rank in (0, 1):
        _as_rank(monkeypatch, 2, rank)
        opt = build_optimizer(build_model(SCENARIOS[scenario], "cpu"))
        opt.load_resharded_state([full])
        _assert_same_state(opt.shard_state(), load_file(str(two / f"{scenario}_optim_rank{rank}.safetensors")))


@pytest.mark.parametrize("scenario", ["sliced", "replicated"])
def test_state_of_two_ranks_loads_on_four_and_back_on_one(worlds, scenario, monkeypatch):
    from tests.dist_optim_worker import SCENARIOS

    one, two = worlds
    full = load_file(str(one / f"{scenario}_optim_rank0.safetensors"))
    saved = [load_file(str(two / f"{scenario}_optim_rank{r}.safetensors")) for r in (0, 1)]
    four = []
    for rank in range(4):  # sliced: wte/lm_head rows in quarters; 6 matrices as 2+2+2+0, 3 c_fc as 1+1+1+0
        _as_rank(monkeypatch, 4, rank)
        opt = build_optimizer(build_model(SCENARIOS[scenario], "cpu"))
        opt.load_resharded_state(saved)
        four.append(opt.shard_state())
        _assert_same_state(four[-1], _expected_shard(full, opt, 4, rank))
    _as_rank(monkeypatch, 1, 0)
    opt = build_optimizer(build_model(SCENARIOS[scenario], "cpu"))
    opt.load_resharded_state(four)
    _assert_same_state(opt.shard_state(), full)


def test_resharding_refuses_shards_out_of_order_or_of_another_model(worlds):
    from tests.dist_optim_worker import SCENARIOS

    _, two = worlds
    saved = [load_file(str(two / f"sliced_optim_rank{r}.safetensors")) for r in (0, 1)]
    opt = build_optimizer(build_model(SCENARIOS["sliced"], "cpu"))
    with pytest.raises(ValueError, match=r"shard 0 of 2 says it is rank 1 of 2; pass optim_rank0 .. optim_rank1"):
        opt.load_resharded_state(saved[::-1])
    with pytest.raises(ValueError, match="shard 0 of 1 says it is rank 0 of 2"):
        opt.load_resharded_state(saved[:1])
    other = build_optimizer(build_model(SCENARIOS["replicated"], "cpu"))
    with pytest.raises(ValueError, match="optimizer shard of rank 0 does not fit.*different depth"):
        other.load_resharded_state(saved)
