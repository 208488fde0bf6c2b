"""What a run will cost before it starts: parameters, tokens, FLOPs, time, money, memory.

    from pipeline import config, estimate
    cfg = config.resolve("speedrun")
    est = estimate.estimate(cfg, "h100")        # plain, JSON-able dict
    est["params"], est["num_iterations"], est["total_seconds"], est["cost_usd"], est["warnings"]
    est["display"]["cost_usd"]                   # "$78.52": the same text the CLI and the web page show

From the command line (prints a table; --json prints the dict):

    python -m pipeline.estimate speedrun --hardware h100 --set depth=26 --set device_batch_size=16

The model-shaped numbers are not re-derived here: parameters, FLOPs per token,
gradient accumulation and the number of steps come from pipeline/plan.py,
the same arithmetic gpt/model.py and trainer/base_train.py use
(tests/test_plan.py builds the real model and compares); the estimate therefore changes when the
trainer does. The hardware (peak FLOP/s, MFU, memory, price) is
pipeline/hardware.py's table, and the later stages' allowances are
pipeline/stages.py's. Everything else is an assumption, written down next to
its number below, and the result says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from pipeline import config, plan, stages as stage_table
from pipeline import hardware as hardware_table
from pipeline.hardware import HARDWARE
from pipeline.report import format_duration


def _host_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16e9  # unknown platform: a laptop-sized guess


# ---------------------------------------------------------------------------
# Assumptions for what is not the pretraining matmuls (each is rough; see the notes in the result)

# Tokenizer training reads and pre-splits the text on CPU: bpe_rust trains 62 MB in ~1 s,
# parquet reading and decoding dominate at scale; 50M characters/s is the planning figure.
TOK_TRAIN_CHARS_PER_SECOND = 50e6
TOK_TRAIN_STARTUP_SECONDS = 5.0
# tok_eval encodes a few MB per text domain with the run-time tokenizer (~3 MB/s/thread).
TOK_EVAL_SECONDS = 30.0
# A few-shot CORE prompt with its continuation, in tokens (10 shots of a short task); shorter
# contexts crop them, so evaluation work shrinks with max_seq_len below this.
CORE_PROMPT_TOKENS = 1024
# Process start, torch import, NCCL setup and torch.compile's first steps (the trainer,
# like the reference, does not count the first 10 steps in its own timing).
STARTUP_SECONDS = {"gpu": 90.0, "cpu": 30.0}
# Checkpoints (fp32 weights + every rank's optimizer shard) go to a local NVMe-class disk.
DISK_BYTES_PER_SECOND = 1e9
# A sample completion event: 6 prompts x 16 new tokens, each a full naive forward pass, latency bound.
SAMPLE_FORWARDS = 6 * 16
SECONDS_PER_LAYER_FORWARD = 0.3e-3
# Stages timed "scaled" in pipeline/stages.py: their reference_seconds are those of a d20 model on
# 8xH100 (the reference's speedrun; stages.py says where each figure comes from), scaled below by
# the model's FLOPs per token and the chosen hardware's throughput (so on 8xH100 at d20 they are
# the reference seconds plus start-up, whatever MFU hardware.py assumes for the H100).
REFERENCE_SHAPE = (20, 65536, 2048)  # depth, vocab, context of the run the allowances were set on
REFERENCE_THROUGHPUT = 8 * HARDWARE["h100"].peak_flops * HARDWARE["h100"].mfu

# Pretraining data: ~250M characters per upstream shard (pipeline.dataset) and ~100 MB on disk
# (the speedrun's 240 shards are ~24 GB). A 65,536-token vocabulary gives ~4.8 characters per token
# on FineWeb-Edu; smaller vocabularies compress less (~0.3 characters fewer per halving, from our
# tokenizer benchmark: 4.62 vs 4.50 bytes/token at 64K vs 32K on the mirror, steeper below).
# Best-fit packing throws away the cropped rest of documents: ~35% of tokens at a 2,048 context
# (reference measurement, gpt/data.py), more at shorter contexts.
SHARD_CHARS = 250e6
SHARD_BYTES = 100e6
CROP_WASTE_AT_2048 = 0.35

# Memory per device. Exact parts: fp32 weights and gradients on every rank, optimizer state
# as the ZeRO-2 optimizer shards it (gpt/optim.py: AdamW 2 moments over ranks, Muon one
# momentum per matrix in blocks of ceil(K/W)), Muon's stacked fp32 gradients during the step,
# and the bf16 weight copies autocast keeps for backward. Activations are not counted from
# kernels: bytes per token x width x layer and per token x vocabulary (logits), with
# coefficients set so that the reference's runs come out as reported: d20 at device batch 32
# fills an 80 GB H100 (and occasionally OOMs, reference issue #443), d32 fits at 8 and
# runs out of memory at 16 (run1000.sh).
ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER = 25
LOGIT_BYTES_PER_TOKEN_VOCAB = 6
RUNTIME_OVERHEAD_BYTES = {"gpu": 2e9, "cpu": 1e9}  # CUDA context + NCCL buffers; Python + torch on CPU
MEMORY_NOTE_FRACTION = 0.9


# ---------------------------------------------------------------------------
# Pieces of the estimate


def _count_every(n: int, every: int, at_zero: bool) -> int:
    """How often base_train's due(every, step) fires over steps 0..n (or 1..n): multiples of `every` and the last."""
    if every <= 0:
        return 1
    return n // every + (0 if n % every == 0 else 1) + (1 if at_zero else 0)


def chars_per_token(vocab_size: int) -> float:
    """Rough compression on web text: ~4.8 at 65,536, about 0.3 fewer per halving of the vocabulary."""
    return max(2.0, 4.8 - 0.3 * math.log2(65536 / vocab_size))


def kept_fraction(seq_len: int) -> float:
    """Share of tokenized text best-fit packing keeps: ~65% at 2,048; shorter rows crop more of each document."""
    return max(0.05, (1 - CROP_WASTE_AT_2048) * min(1.0, seq_len / 2048))


def memory_per_device(cfg: dict, shape: plan.ModelShape, world: int, kind: str) -> dict:
    """Estimated peak bytes on one device during pretraining, by part."""
    adamw_state = 0
    for rows, cols in shape.adamw_shapes:
        # Sharded along dim 0 when it divides by the world (and is worth it), else whole on every rank.
        sharded = world > 1 and rows * cols >= 1024 and rows % world == 0
        adamw_state += 2 * 4 * (rows * cols // world if sharded else rows * cols)
    muon_state = muon_workspace = 0
    for dims, count in shape.muon_shapes:
        numel = math.prod(dims)
        per_rank = -(-count // world)  # each rank owns a block of ceil(K/W) same-shape matrices
        muon_state += 4 * per_rank * numel
        muon_workspace += 4 * per_rank * world * numel  # stacked, zero-padded fp32 gradients of the group
    tokens = cfg["device_batch_size"] * cfg["max_seq_len"]
    parts = {
        "weights": 4 * shape.params,
        "gradients": 4 * shape.params,
        "bf16_weight_copies": 2 * shape.linear_params,
        "optimizer_state": adamw_state + muon_state,
        "optimizer_workspace": muon_workspace,
        "activations": tokens * ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER * shape.width * cfg["depth"],
        "logits": tokens * LOGIT_BYTES_PER_TOKEN_VOCAB * cfg["vocab_size"],
        "runtime": RUNTIME_OVERHEAD_BYTES[kind],
    }
    return {k: float(v) for k, v in parts.items()}


def _largest_batch_that_fits(cfg: dict, shape: plan.ModelShape, world: int, kind: str, limit: float) -> int | None:
    """The largest power-of-two device_batch_size below the current one that fits and keeps the total batch whole."""
    dbs = cfg["device_batch_size"]
    while dbs > 1:
        dbs = 1 << ((dbs - 1).bit_length() - 1)  # next power of two below
        trial = {**cfg, "device_batch_size": dbs}
        if sum(memory_per_device(trial, shape, world, kind).values()) <= limit and \
                plan.batch_mismatch(cfg["total_batch_size"], dbs, cfg["max_seq_len"], world) is None:
            return dbs
    return None


def _with_defaults(cfg: dict) -> dict:
    out = {f.name: f.default for f in config.FIELDS}
    out.update(cfg)
    if out.get("stages") is None:
        out["stages"] = config.available_stages()
    return out


# ---------------------------------------------------------------------------
# The estimate


def estimate(cfg: dict, hardware: str) -> dict:
    """Estimate a resolved configuration (config.resolve) on `hardware` (a pipeline.hardware.HARDWARE key). JSON-able.

    Raises ValueError for an unknown hardware key. Problems with the settings themselves are
    not raised but listed in "warnings" (will fail or likely fail) and "notes" (worth knowing).
    """
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; choose from {', '.join(HARDWARE)}")
    hw = HARDWARE[hardware]
    cfg = _with_defaults(cfg)
    kind = "cpu" if hardware == "cpu" else "gpu"
    world = cfg["nproc_per_node"] * cfg["nnodes"]  # ranks, as torchrun will start them
    devices = 1 if kind == "cpu" else world  # a CPU machine is one device however many processes share it
    depth, vocab, seq = cfg["depth"], cfg["vocab_size"], cfg["max_seq_len"]
    warnings: list[str] = []
    notes: list[str] = []

    shape = plan.model_shape(depth, vocab, seq)  # the GPT base_train builds from the studio's flags
    fpt = shape.flops_per_token
    # target_flops is not a studio knob: -1, as base_train's default.
    num_iterations, horizon_from = plan.horizon(cfg["num_iterations"], -1.0, cfg["target_param_data_ratio"],
                                                cfg["total_batch_size"], fpt, shape.scaling_params)
    problem = plan.horizon_problem(cfg["num_iterations"], -1.0, cfg["target_param_data_ratio"])
    if problem:
        warnings.append(f"num_iterations: {problem}")
    # None exactly where base_train would refuse the batch (then the rest is estimated all the same).
    problem = plan.batch_mismatch(cfg["total_batch_size"], cfg["device_batch_size"], seq, world)
    accum = None if problem else plan.grad_accumulation(cfg["total_batch_size"], cfg["device_batch_size"], seq, world)
    if problem:
        warnings.append(f"total_batch_size: {problem}")
    tokens = num_iterations * cfg["total_batch_size"]
    train_flops = fpt * tokens
    throughput = devices * hw.peak_flops * hw.mfu  # model FLOP/s the whole job sustains

    # Pretraining: the optimizer steps, plus what the stage does around them.
    train_seconds = train_flops / throughput
    per_eval = max(1, cfg["eval_tokens"] // (cfg["device_batch_size"] * seq * world)) * cfg["device_batch_size"] * seq * world
    n_evals = _count_every(num_iterations, cfg["eval_every"], at_zero=cfg["eval_every"] > 0)
    eval_seconds = n_evals * per_eval * (fpt / 3) / throughput  # forward only: a third of training FLOPs
    n_samples = _count_every(num_iterations, cfg["sample_every"], at_zero=False)
    sample_seconds = n_samples * SAMPLE_FORWARDS * (depth * SECONDS_PER_LAYER_FORWARD + (fpt / 3) * 24 / (hw.peak_flops * hw.mfu))
    n_saves = _count_every(num_iterations, cfg["save_every"], at_zero=False)
    mem = memory_per_device(cfg, shape, world, kind)
    checkpoint_bytes = mem["weights"] + mem["optimizer_state"] * world
    save_seconds = n_saves * checkpoint_bytes / DISK_BYTES_PER_SECOND
    pretrain_seconds = STARTUP_SECONDS[kind] + train_seconds + eval_seconds + sample_seconds + save_seconds
    if eval_seconds > 0.2 * train_seconds:
        notes.append(f"validation takes {eval_seconds / train_seconds:.0%} of the training time: raise eval_every or lower eval_tokens")

    # Every selected stage, in pipeline order, timed as pipeline/stages.py says.
    ref_fpt = plan.model_shape(*REFERENCE_SHAPE).flops_per_token
    stages = []
    for name in cfg["stages"]:
        stage = stage_table.BY_NAME.get(name)
        if stage is None:  # not a stage (an unvalidated configuration): nothing to time
            continue
        if stage.timing == "tokenizer":
            seconds, basis = TOK_TRAIN_STARTUP_SECONDS + cfg["tok_max_chars"] / TOK_TRAIN_CHARS_PER_SECOND, \
                f"{cfg['tok_max_chars']:,} characters at ~{TOK_TRAIN_CHARS_PER_SECOND / 1e6:.0f}M/s on CPU"
        elif stage.timing == "tokenizer_eval":
            seconds, basis = TOK_EVAL_SECONDS, "compression on a few MB per text domain"
        elif stage.timing == "pretrain":
            seconds = pretrain_seconds
            basis = (f"{num_iterations:,} steps at {hw.mfu:.0%} MFU; {n_evals} validations, "
                     f"{n_saves} checkpoints, start-up and compilation")
        elif stage.timing == "scaled":
            share, basis = 1.0, f"{stage.timing_basis}; rough allowance"
            cap = cfg.get(stage.share_field, -1) if stage.share_field else -1
            if cap >= 0:  # e.g. at most k examples per CORE task: that share of the reference's work
                share = min(1.0, stage.share_tasks * cap / stage.reference_items)
                basis = f"{stage.timing_basis}, at most {cap:,} items per task ({share:.1%}); rough allowance"
            if stage.share_field:
                # Few-shot prompts run to ~1,000 tokens; a shorter context crops them (left-cropping).
                share *= min(1.0, cfg["max_seq_len"] / CORE_PROMPT_TOKENS)
            seconds = STARTUP_SECONDS[kind] + share * stage.reference_seconds * (fpt / ref_fpt) * (REFERENCE_THROUGHPUT / throughput)
        else:
            raise ValueError(f"stage {name}: unknown timing {stage.timing!r} in pipeline/stages.py")
        stages.append({"stage": name, "seconds": round(seconds, 1), "basis": basis})
    total_seconds = sum(s["seconds"] for s in stages)
    if "base_train" not in cfg["stages"]:
        notes.append("base_train is not selected: the pretraining numbers describe the model, not this run's time")

    # Money: the whole machine is rented for the whole pipeline, GPUs idle or not.
    device_hours = total_seconds / 3600 * devices
    cost = device_hours * hardware_table.hourly_price(hw)

    # Memory.
    per_device = sum(mem.values())
    device_memory = _host_memory_bytes() if hw.memory_gb is None else hw.memory_gb * 1e9
    where = "this machine's RAM" if kind == "cpu" else f"the {hw.memory_gb} GB of one {hw.short}"
    if per_device > device_memory:
        fits = _largest_batch_that_fits(cfg, shape, world, kind, device_memory)
        fix = (f"try device_batch_size {fits} (gradient accumulation keeps the global batch)" if fits
               else "the model state alone does not fit: use a GPU with more memory or a smaller depth")
        warnings.append(f"needs ~{_gb(per_device)} per device, more than {where}: likely out of memory; {fix}")
    elif per_device > MEMORY_NOTE_FRACTION * device_memory:
        notes.append(f"~{_gb(per_device)} per device is close to {where}; if it runs out of memory, halve device_batch_size")

    # Data: what the selected shards hold, after packing, against what training reads.
    data = {"shards": cfg["data_shards"], "download_bytes": 0.0, "tokens_available": None, "epochs": None}
    if not cfg["data_dir"]:
        from pipeline.dataset import SOURCES  # cheap: no torch

        data["download_bytes"] = (cfg["data_shards"] + 1) * SHARD_BYTES  # + the validation shard
        available = cfg["data_shards"] * SHARD_CHARS / chars_per_token(vocab) * kept_fraction(seq)
        data["tokens_available"] = available
        data["epochs"] = tokens / available
        last = SOURCES[cfg["data_source"]].last_shard
        if cfg["data_shards"] > last:
            warnings.append(f"{cfg['data_source']} has {last} training shards, fewer than data_shards {cfg['data_shards']}")
        elif "base_train" in cfg["stages"] and data["epochs"] > 1.05:
            need = math.ceil(tokens / (SHARD_CHARS / chars_per_token(vocab) * kept_fraction(seq)))
            warnings.append(f"{cfg['data_shards']} shards hold ~{_count(available)} trainable tokens after packing, training "
                            f"reads {_count(tokens)}: data repeats ({data['epochs']:.2f} epochs); use data_shards >= {need}")
        notes.append(f"downloads ~{_gb(data['download_bytes'])} of shards first unless they are cached or mirrored")
    if kind == "cpu" and world > 1:
        notes.append(f"on a CPU the {world} processes share the same cores: no faster than nproc_per_node 1")
    ratio = tokens / shape.scaling_params
    if ratio < 5 or ratio > 100:
        notes.append(f"{ratio:.1f} tokens per parameter; compute-optimal training is ~20")

    result = {
        "preset": cfg.get("preset", ""),
        "hardware": hardware,
        "hardware_label": hw.label,
        "devices": devices,
        "world_size": world,
        "peak_flops_per_device": hw.peak_flops,
        "mfu": hw.mfu,
        "usd_per_device_hour": hardware_table.hourly_price(hw),
        "model": {"depth": depth, "width": shape.width, "heads": shape.heads, "kv_heads": shape.kv_heads,
                  "head_dim": shape.head_dim, "vocab_size": vocab, "seq_len": seq},
        "params": shape.params,
        "scaling_params": shape.scaling_params,
        "flops_per_token": fpt,
        "num_iterations": num_iterations,
        "horizon_from": horizon_from,
        "grad_accum": accum,
        "total_batch_size": cfg["total_batch_size"],
        "tokens": tokens,
        "tokens_per_param": ratio,
        "total_flops": train_flops,
        "step_seconds": cfg["total_batch_size"] * fpt / throughput,
        "tokens_per_second": throughput / fpt,
        "train_seconds": train_seconds,  # the optimizer steps alone: FLOPs / (devices x peak x MFU)
        "pretrain_seconds": pretrain_seconds,  # the whole base_train stage
        "stages": stages,
        "total_seconds": total_seconds,
        "device_hours": device_hours,
        "cost_usd": cost,
        "memory_per_device": per_device,
        "device_memory": device_memory,
        "memory_fraction": per_device / device_memory,
        "memory_breakdown": mem,
        "data": data,
        "warnings": warnings,
        "notes": notes,
    }
    result["display"] = display(result)
    return result


# ---------------------------------------------------------------------------
# Text (one formatter for the CLI, the server-rendered page and the live page)


def _count(n: float) -> str:
    """1.23 B, 561 M, 5.24 M, 12.3 K, 950."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.3g}"


def _flops(x: float) -> str:
    """4.5e18: two significant digits, no '+'."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _short_duration(seconds: float) -> str:
    """514 ms, 1.05 s, then as _duration."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s" if seconds < 60 else format_duration(seconds)


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b < 100e9 else f"{b / 1e9:,.0f} GB"


def display(est: dict) -> dict:
    """The estimate's headline numbers as short text, keyed like the estimate."""
    mem = f"{_gb(est['memory_per_device'])} of {_gb(est['device_memory'])} ({est['memory_fraction']:.0%})"
    return {
        "params": _count(est["params"]),
        "scaling_params": _count(est["scaling_params"]),
        "flops_per_token": _flops(est["flops_per_token"]),
        "num_iterations": f"{est['num_iterations']:,}",
        "grad_accum": "-" if est["grad_accum"] is None else str(est["grad_accum"]),
        "tokens": _count(est["tokens"]),
        "tokens_per_param": f"{est['tokens_per_param']:.1f}",
        "total_flops": f"{_flops(est['total_flops'])} FLOPs",
        "hardware": f"{est['devices']} x {est['hardware_label']}",
        "step_seconds": _short_duration(est["step_seconds"]),
        "tokens_per_second": f"{_count(est['tokens_per_second'])}/s",
        "pretrain_seconds": format_duration(est["pretrain_seconds"]),
        "total_seconds": format_duration(est["total_seconds"]),
        "device_hours": f"{est['device_hours']:,.1f}",
        "cost_usd": _usd(est["cost_usd"]),
        "memory_per_device": mem,
        "stages": [{"stage": s["stage"], "time": format_duration(s["seconds"]), "basis": s["basis"]} for s in est["stages"]],
        "assumptions": (f"{est['mfu']:.0%} MFU of {_flops(est['peak_flops_per_device'])} FLOP/s per device, "
                        f"{_usd(est['usd_per_device_hour'])} per device-hour"),
    }


def format_table(est: dict) -> str:
    """A plain-text report of an estimate (the CLI's output)."""
    d = est["display"]
    m = est["model"]
    rows = [
        ("hardware", f"{d['hardware']} (peak {_flops(est['peak_flops_per_device'])} FLOP/s, MFU {est['mfu']:.0%}, "
                     f"{_usd(est['usd_per_device_hour'])}/device-hour)"),
        ("model", f"depth {m['depth']}, width {m['width']}, {m['heads']} head{'s' if m['heads'] != 1 else ''}, vocab {m['vocab_size']:,}, context {m['seq_len']:,}"),
        ("params", f"{d['params']} ({est['params']:,}; {d['scaling_params']} scaling)"),
        ("FLOPs per token", d["flops_per_token"]),
        ("steps", f"{d['num_iterations']} ({est['horizon_from']}; grad accumulation {d['grad_accum']})"),
        ("tokens", f"{d['tokens']} ({d['tokens_per_param']} per parameter)"),
        ("training FLOPs", d["total_flops"]),
        ("step time", f"{d['step_seconds']} ({d['tokens_per_second']})"),
        ("memory per device", d["memory_per_device"]),
    ]
    rows += [(f"  {s['stage']}", f"{s['time']}  ({s['basis']})") for s in d["stages"]]
    rows += [
        ("total time", d["total_seconds"]),
        ("device-hours", d["device_hours"]),
        ("cost", d["cost_usd"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"WARNING: {w}" for w in est["warnings"]]
    lines += [f"note: {n}" for n in est["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Estimate parameters, FLOPs, time, cost and memory of a run before launching it.")
    parser.add_argument("preset", choices=sorted(config.PRESETS), help="starting preset")
    parser.add_argument("--hardware", choices=list(HARDWARE), default=None, help="device kind (default: the GPUs nvidia-smi lists, else cpu)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = config.resolve(args.preset, config.parse_overrides(args.set))
    except config.ConfigError as e:
        parser.error(str(e))
    est = estimate(cfg, args.hardware or hardware_table.default_hardware())
    print(json.dumps(est, indent=2) if args.json else format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
