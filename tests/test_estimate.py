"""The pre-launch estimate agrees with the trainer and lands where the reference's runs did."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline import config, estimate, hardware as hardware_table, plan, stages
from gpt import common
from trainer import base_train
from gpt.model import GPT, GPTConfig
from tests.helpers import count_params_by_hand, flops_per_token_by_hand

# The reference pipeline the MISSION's "~4 h, ~$100" describes (RL was optional there).
FULL_PIPELINE = [s for s in stages.ORDER if not s.startswith("rl_")]


def trainer_model_and_args(cfg: dict):
    """What base_train would build from the studio's own command line for this config (model on meta)."""
    command = next(c for c in config.stage_commands(cfg, "runs/x") if c.name == "base_train")
    args = base_train.parse_args(command.argv[command.argv.index("trainer.base_train") + 1:])
    model_config = GPTConfig.from_depth(args.depth, cfg["vocab_size"], sequence_len=args.max_seq_len,
                                        aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                        n_kv_head=args.n_kv_head, window_pattern=args.window_pattern)
    with torch.device("meta"):
        return GPT(model_config), args


def test_params_and_flops_per_token_match_a_materialised_model():
    cfg = config.resolve("smoke")
    est = estimate.estimate(cfg, "cpu")
    model = GPT(GPTConfig.from_depth(cfg["depth"], cfg["vocab_size"], sequence_len=cfg["max_seq_len"]))  # real CPU tensors
    assert est["params"] == model.num_params()
    assert est["scaling_params"] == model.num_scaling_params()
    assert est["flops_per_token"] == model.flops_per_token()


@pytest.mark.parametrize("depth", [12, 20, 32])
def test_params_and_flops_per_token_match_the_trainers_formulas(depth):
    cfg = config.resolve("speedrun", {"depth": depth, "device_batch_size": 8})
    est = estimate.estimate(cfg, "h100")
    shape = GPTConfig.from_depth(depth, cfg["vocab_size"], sequence_len=cfg["max_seq_len"])
    assert est["params"] == count_params_by_hand(shape)
    assert est["flops_per_token"] == pytest.approx(flops_per_token_by_hand(shape))
    assert est["model"]["width"] == shape.n_embd


def test_depth_20_has_the_documented_parameter_count():
    assert estimate.estimate(config.resolve("speedrun"), "h100")["params"] == 560_988_160


@pytest.mark.parametrize("preset, overrides", [
    ("speedrun", {}),                                   # tokens-per-parameter ratio
    ("tiny", {"target_param_data_ratio": 3.5}),         # another ratio, small model
    ("smoke", {}),                                      # explicit num_iterations
    ("d26", {"num_iterations": 1234}),
])
def test_steps_tokens_and_flops_are_what_base_train_derives(preset, overrides):
    cfg = config.resolve(preset, overrides)
    est = estimate.estimate(cfg, "h100")
    model, args = trainer_model_and_args(cfg)
    steps, horizon_from = plan.horizon(args.num_iterations, args.target_flops, args.target_param_data_ratio,
                                       args.total_batch_size, model.flops_per_token(), model.num_scaling_params())
    assert (est["num_iterations"], est["horizon_from"]) == (steps, horizon_from)
    assert est["tokens"] == steps * args.total_batch_size
    assert est["total_flops"] == model.flops_per_token() * steps * args.total_batch_size  # as its "setup" event says
    world = cfg["nproc_per_node"] * cfg["nnodes"]
    assert est["grad_accum"] == base_train.grad_accumulation(args.total_batch_size, args.device_batch_size, args.max_seq_len, world)


def test_speedrun_on_8_h100_lands_in_the_missions_ballpark():
    cfg = {**config.resolve("speedrun"), "stages": FULL_PIPELINE}  # stages not built yet are estimated all the same
    est = estimate.estimate(cfg, "h100")
    assert est["devices"] == 8
    assert 2 * 3600 <= est["total_seconds"] <= 6 * 3600
    assert 50 <= est["cost_usd"] <= 200
    assert est["cost_usd"] == pytest.approx(est["total_seconds"] / 3600 * 8 * 3.00)
    assert [s["stage"] for s in est["stages"]] == FULL_PIPELINE


def test_only_the_selected_stages_are_timed():
    est = estimate.estimate(config.resolve("speedrun", {"stages": "tok_train"}), "h100")
    assert [s["stage"] for s in est["stages"]] == ["tok_train"]
    assert est["total_seconds"] == est["stages"][0]["seconds"] < 120


def test_cpu_runs_cost_nothing_and_count_as_one_device():
    est = estimate.estimate(config.resolve("tiny", {"nproc_per_node": 2, "total_batch_size": 4096}), "cpu")
    assert est["cost_usd"] == 0 and est["devices"] == 1 and est["world_size"] == 2
    assert any("share the same cores" in n for n in est["notes"])


def test_a_batch_that_does_not_divide_is_warned_with_a_fix():
    cfg = {**config.resolve("tiny"), "total_batch_size": 3000}  # config.resolve would refuse it; the trainer too
    est = estimate.estimate(cfg, "cpu")
    assert est["grad_accum"] is None
    assert f"total_batch_size: {plan.batch_mismatch(3000, 8, 256, 1)}" in est["warnings"]  # config.validate's words
    assert any("not a multiple of" in w and "use e.g. total_batch_size 2048" in w for w in est["warnings"])


def test_d32_with_a_huge_device_batch_on_one_gpu_warns_about_memory():
    cfg = config.resolve("d32", {"nproc_per_node": 1, "device_batch_size": 128})
    est = estimate.estimate(cfg, "h100")
    assert est["memory_per_device"] > 80e9
    warning = next(w for w in est["warnings"] if "out of memory" in w)
    assert "try device_batch_size" in warning


def test_the_reference_batch_sizes_fit_an_h100_and_twice_them_do_not():
    # Reference runs on 80 GB H100s: d20 at device batch 32 and d32 at 8 fit; d32 at 16 ran out of memory.
    def out_of_memory(preset, batch):
        total = max(524288, batch * 2048 * 8)  # 8 GPUs; the reference's global batch where it divides
        est = estimate.estimate(config.resolve(preset, {"device_batch_size": batch, "total_batch_size": total}), "h100")
        return any("out of memory" in w for w in est["warnings"])

    assert not out_of_memory("speedrun", 32) and not out_of_memory("d32", 8)
    assert out_of_memory("d32", 16) and out_of_memory("speedrun", 64)


def test_too_few_shards_for_the_horizon_is_warned():
    few = estimate.estimate(config.resolve("speedrun", {"data_shards": 100}), "h100")
    enough = estimate.estimate(config.resolve("speedrun", {"data_shards": 400}), "h100")
    assert any("data repeats" in w for w in few["warnings"])
    assert not any("data repeats" in w for w in enough["warnings"])


def test_num_iterations_zero_is_warned():
    est = estimate.estimate({**config.resolve("smoke"), "num_iterations": 0}, "cpu")
    assert f"num_iterations: {plan.horizon_problem(0, -1.0, 20.0)}" in est["warnings"]  # config.validate's words


def test_hardware_peaks_match_the_trainers_mfu_table():
    for key, hw in hardware_table.HARDWARE.items():
        if key != "cpu":
            assert common.peak_flops(hw.label) == hw.peak_flops, key


def test_gpu_names_map_to_hardware_kinds():
    assert hardware_table.hardware_for_gpu_name("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)") == "h100"
    assert hardware_table.hardware_for_gpu_name("NVIDIA H200") == "h200"
    assert hardware_table.hardware_for_gpu_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert hardware_table.hardware_for_gpu_name("NVIDIA GeForce GTX 1080") is None
    assert hardware_table.default_hardware() in hardware_table.HARDWARE


def test_unknown_hardware_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="h100"):
        estimate.estimate(config.resolve("tiny"), "tpu")


def test_a_second_estimate_reuses_the_model_shape():
    cfg = config.resolve("speedrun", {"depth": 14})
    estimate.estimate(cfg, "h100")
    hits = plan.model_shape.cache_info().hits
    estimate.estimate({**cfg, "device_batch_size": 16}, "a100")
    assert plan.model_shape.cache_info().hits > hits


def test_estimate_is_plain_json():
    est = estimate.estimate(config.resolve("speedrun"), "h100")
    assert json.loads(json.dumps(est)) == est


@pytest.mark.parametrize("func, value, text", [
    (estimate._count, 1.234e9, "1.23 B"),
    (estimate._count, 560_988_160, "561 M"),
    (estimate._flops, 4.5e18, "4.5e18"),
    (estimate.format_duration, 3 * 3600 + 5 * 60, "3 h 05 m"),
    (estimate.format_duration, 750, "12 m 30 s"),
    (estimate.format_duration, 5 * 86400 + 3 * 3600, "5 d 03 h"),
    (estimate._usd, 96, "$96.00"),
    (estimate._usd, 1234.5, "$1,234.50"),
])
def test_numbers_are_written_for_people(func, value, text):
    assert func(value) == text


def test_cli_prints_a_table(capsys):
    assert estimate.main(["speedrun", "--hardware", "h100", "--set", "depth=12"]) == 0
    out = capsys.readouterr().out
    assert "8 x NVIDIA H100" in out and "depth 12" in out and "cost" in out and "$" in out


def test_cli_prints_json(capsys):
    estimate.main(["tiny", "--hardware", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out)["cost_usd"] == 0


def test_cli_names_a_bad_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        estimate.main(["tiny", "--set", "depth=0"])
    assert exit_info.value.code == 2 and "depth" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The new-run page renders the estimate and every knob (the context the new-run view passes)


def render_new_run(rf, preset="speedrun", hardware="h100", initial=True):
    from django.contrib.auth.models import AnonymousUser
    from django.template.loader import render_to_string

    from studio.forms import NewRunForm

    request = rf.get("/runs/new/", {"preset": preset})
    request.user = AnonymousUser()
    return render_to_string("studio/new_run.html", {
        "form": NewRunForm(preset=preset),
        "presets": config.PRESETS,
        "preset": preset,
        "hardware_choices": hardware_table.hardware_choices(),
        "hardware": hardware,
        "estimate_url": "/runs/estimate/",
        "initial_estimate": estimate.estimate(config.resolve(preset), hardware) if initial else None,
    }, request=request)


def test_new_run_page_shows_every_knob_once_in_its_group(rf):
    html = render_new_run(rf)
    for f in config.FIELDS:
        assert html.count(f'data-field="{f.name}"') == 1, f.name
    for legend in ("Model", "Batch &amp; horizon", "Hardware", "Data &amp; tokenizer", "Evaluation &amp; checkpoints", "Stages"):
        assert f"<legend>{legend}" in html
    hardware_group = html[html.index("<legend>Hardware"):html.index("<legend>Data")]
    assert 'data-field="nproc_per_node"' in hardware_group and 'data-field="rdzv_endpoint"' in hardware_group
    assert '<select name="hardware" id="id_hardware"><option value="cpu">' in hardware_group
    assert '<option value="h100" selected>' in hardware_group


def test_a_knob_in_no_group_still_appears_under_more_settings(rf, monkeypatch):
    extra = config.Field("warp_factor", int, 1, "A knob the page does not know yet.", 1, 9)
    monkeypatch.setattr(config, "FIELDS", [*config.FIELDS, extra])
    monkeypatch.setitem(config.FIELD_BY_NAME, "warp_factor", extra)
    html = render_new_run(rf, initial=False)
    assert html.index('data-field="warp_factor"') > html.index("<legend>More settings")


def test_new_run_page_renders_the_estimate_without_javascript(rf):
    html = render_new_run(rf)
    shown = estimate.estimate(config.resolve("speedrun"), "h100")["display"]
    for key in ("total_seconds", "cost_usd", "params", "tokens", "total_flops", "num_iterations"):
        assert re.search(rf'data-est="{key}"[^>]*>{re.escape(shown[key])}<', html), key
    assert 'data-state="ready"' in html and 'data-estimate-url="/runs/estimate/"' in html
    assert "/static/js/new_run.js" in html and 'name="csrfmiddlewaretoken"' in html


def test_new_run_page_without_an_estimate_asks_for_one(rf):
    html = render_new_run(rf, initial=False)
    assert 'data-state="empty"' in html and "The estimate appears here." in html


def test_base_eval_is_timed_by_the_share_of_core_it_runs():
    """A capped CORE (the small presets' core_max_per_task) is a small share of the full one's allowance."""
    def seconds(cfg):
        return next(s["seconds"] for s in estimate.estimate(cfg, "cpu")["stages"] if s["stage"] == "base_eval")

    full, capped = config.resolve("tiny", {"core_max_per_task": -1}), config.resolve("tiny", {"core_max_per_task": 50})
    assert seconds(capped) < seconds(full) / 10
    assert seconds(config.resolve("tiny", {"core_max_per_task": 10**6})) == seconds(full)  # no more than all of it
