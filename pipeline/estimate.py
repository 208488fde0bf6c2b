"""What a run will cost before it starts: parameters, tokens, FLOPs, time, money, memory.

    from pipeline import config, estimate
    cfg = config.resolve("speedrun")
    est = estimate.estimate(cfg, "h100")        # plain, JSON-able dict
    est["params"], est["num_iterations"], est["total_seconds"], est["cost_usd"], est["warnings"]
    est["display"]["cost_usd"]                   # "$78.52": the same text the CLI and the web page show

From the command line (prints a table; --json prints the dict):

    python -m pipeline.estimate speedrun --hardware h100 --set depth=26 --set device_batch_size=16

The model-shaped numbers are not re-derived here: parameters and FLOPs per
token come from gpt.model's own GPT (built on the meta device, so no
memory and no time even at depth 32), and the number of steps from
trainer.base_train's own `horizon()`; the estimate therefore changes when
the trainer does. Everything else (MFU, prices, other stages, memory) is an
assumption, written down next to its number below, and the result says so.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

from pipeline import config
from pipeline.report import format_duration

# ---------------------------------------------------------------------------
# Hardware
#
# peak_flops: vendor datasheet dense bf16 FLOP/s per device (no sparsity), the
#   same figures as gpt.common.PEAK_FLOPS (a test keeps them equal), except
#   "cpu", which is the measured bf16 2048^3 GEMM peak of this project's 2-core
#   machines (bench/train.py, BENCHMARKS.md).
# mfu: assumed model-FLOPs utilisation of pretraining.
#   - H100: the reference reported 47-51% on 8xH100 for d32/d34 (run1000 log,
#     d34 model card); 45% leaves room for our trainer, not measured on GPU yet.
#   - H200: same compute as H100, more bandwidth: a little higher.
#   - A100/A800: a community 8xA100 d20 run printed 20.8% MFU against the H100
#     peak, i.e. ~66% of the A100's 312e12 (6.6 h pretraining); the reported
#     8xA800 reproduction (~7 h) agrees. We assume 60%.
#   - CPU: bench/train.py measured 39.8% on the tiny preset; 35% is the prudent round-down.
#   - L40S, RTX 4090, B200, MI300X: no reference run; assumptions (less tuned
#     kernels or less memory bandwidth than an H100).
# usd_per_hour: rough on-demand price per device-hour in 2025 (the reference's
#   "$100 run" assumes $3/GPU-hour for H100); change them for your provider.
# memory_gb: per device (decimal GB); None = this machine's RAM.
# match: substrings of `nvidia-smi -L` names that mean this kind (first hit wins).
HARDWARE: dict[str, dict] = {
    "cpu": dict(label="CPU (this machine)", short="CPU", peak_flops=370e9, mfu=0.35, usd_per_hour=0.0, memory_gb=None, match=()),
    "h100": dict(label="NVIDIA H100 SXM 80 GB", short="H100", peak_flops=989e12, mfu=0.45, usd_per_hour=3.00, memory_gb=80,
                 match=("H100", "H800")),
    "h200": dict(label="NVIDIA H200 141 GB", short="H200", peak_flops=989e12, mfu=0.47, usd_per_hour=3.50, memory_gb=141,
                 match=("H200",)),
    "a100": dict(label="NVIDIA A100 80 GB", short="A100", peak_flops=312e12, mfu=0.60, usd_per_hour=1.80, memory_gb=80,
                 match=("A100",)),
    "a800": dict(label="NVIDIA A800 80 GB", short="A800", peak_flops=312e12, mfu=0.60, usd_per_hour=1.50, memory_gb=80,
                 match=("A800",)),
    "l40s": dict(label="NVIDIA L40S 48 GB", short="L40S", peak_flops=362e12, mfu=0.40, usd_per_hour=1.00, memory_gb=48,
                 match=("L40S",)),
    "rtx4090": dict(label="NVIDIA RTX 4090 24 GB", short="RTX 4090", peak_flops=165.2e12, mfu=0.40, usd_per_hour=0.40, memory_gb=24,
                    match=("4090",)),
    "b200": dict(label="NVIDIA B200 180 GB", short="B200", peak_flops=2.25e15, mfu=0.40, usd_per_hour=6.00, memory_gb=180,
                 match=("B200",)),
    "mi300x": dict(label="AMD MI300X 192 GB", short="MI300X", peak_flops=1.3074e15, mfu=0.30, usd_per_hour=2.50, memory_gb=192,
                   match=("MI300X",)),
}


def hardware_choices() -> list[tuple[str, str]]:
    """(key, label) pairs for a select box, in table order."""
    return [(key, hw["label"]) for key, hw in HARDWARE.items()]


def hardware_for_gpu_name(name: str) -> str | None:
    """The HARDWARE key for a GPU name as nvidia-smi or torch print it, or None if unknown."""
    for key, hw in HARDWARE.items():
        if any(m in name for m in hw["match"]):
            return key
    return None


@functools.lru_cache(maxsize=1)
def default_hardware() -> str:
    """The kind of GPU `nvidia-smi -L` lists on this machine, else "cpu". Cached: the GPUs do not change."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    for line in out.splitlines():
        key = hardware_for_gpu_name(line)
        if key:
            return key
    return "cpu"


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
# Process start, torch import, NCCL setup and torch.compile's first steps (the trainer,
# like the reference, does not count the first 10 steps in its own timing).
STARTUP_SECONDS = {"gpu": 90.0, "cpu": 30.0}
# Checkpoints (fp32 weights + every rank's optimizer shard) go to a local NVMe-class disk.
DISK_BYTES_PER_SECOND = 1e9
# A sample completion event: 6 prompts x 16 new tokens, each a full naive forward pass, latency bound.
SAMPLE_FORWARDS = 6 * 16
SECONDS_PER_LAYER_FORWARD = 0.3e-3
# Later stages, as seconds of a d20 model on 8xH100 at the assumed 45% MFU (the reference's
# speedrun), scaled below by the model's FLOPs per token and the chosen hardware's throughput.
# Sources: reference/nanochat-facts.md (midtraining ~765 steps x 524,288 tokens; SFT ~650 steps;
# RL 467 steps x 256 sampled completions; the 8xA800 reproduction's 15 min mid + 13 min SFT).
OTHER_STAGES = {
    "base_eval": (300.0, "CORE (22 few-shot tasks, ~1e8 forward tokens) + bits-per-byte"),
    "mid_train": (480.0, "one epoch of the ~568K-conversation mixture (~4e8 tokens)"),
    "mid_eval": (480.0, "chat evals: ARC, MMLU, GSM8K with tools, HumanEval (generation-bound)"),
    "sft_train": (480.0, "~650 steps of padded conversations, with periodic evals"),
    "sft_eval": (480.0, "chat evals: ARC, MMLU, GSM8K with tools, HumanEval (generation-bound)"),
    "rl_train": (3600.0, "GRPO on GSM8K: 467 steps of 256 sampled completions (generation-bound)"),
    "rl_eval": (300.0, "GSM8K pass@k"),
}
REFERENCE_SHAPE = (20, 65536, 2048)  # depth, vocab, context of the run the allowances were set on
REFERENCE_THROUGHPUT = 8 * 989e12 * 0.45

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
# The model, as the trainer builds it


@functools.lru_cache(maxsize=64)
def _meta_model(depth: int, vocab_size: int, seq_len: int):
    """The trainer's GPT for this shape, on the meta device (no memory). Cached: built once per shape."""
    import torch

    from gpt.model import GPT, GPTConfig

    # The same family base_train builds (its defaults for aspect ratio, head dim, kv heads, windows).
    cfg = GPTConfig.from_depth(depth, vocab_size, sequence_len=seq_len)
    with torch.device("meta"):
        return GPT(cfg)


@functools.lru_cache(maxsize=64)
def _model_shape(depth: int, vocab_size: int, seq_len: int) -> dict:
    model = _meta_model(depth, vocab_size, seq_len)
    c = model.config
    named = dict(model.named_parameters())
    adamw = {"lm_head.weight", "transformer.wte.weight"}  # as gpt.optim.build_optimizer groups them
    muon_shapes: dict[tuple, int] = {}
    for name, p in named.items():
        if name not in adamw:
            muon_shapes[tuple(p.shape)] = muon_shapes.get(tuple(p.shape), 0) + 1
    return {
        "params": model.num_params(),
        "scaling_params": model.num_scaling_params(),
        "flops_per_token": model.flops_per_token(),
        "linear_params": model.num_params() - named["transformer.wte.weight"].numel(),
        "adamw_shapes": [tuple(named[n].shape) for n in sorted(adamw)],
        "muon_shapes": sorted(muon_shapes.items()),
        "width": c.n_embd,
        "heads": c.n_head,
        "kv_heads": c.n_kv_head,
        "head_dim": c.head_dim,
    }


def _horizon(cfg: dict, depth: int, vocab: int, seq: int) -> tuple[int, str]:
    """base_train's own horizon(), fed the flags the studio would pass (target_flops is not a studio knob)."""
    from trainer.base_train import horizon

    args = SimpleNamespace(num_iterations=cfg["num_iterations"], target_flops=-1.0,
                           target_param_data_ratio=cfg["target_param_data_ratio"],
                           total_batch_size=cfg["total_batch_size"])
    return horizon(args, _meta_model(depth, vocab, seq))


def _grad_accumulation(cfg: dict, world: int) -> tuple[int | None, str | None]:
    """(accumulation steps, None) or (None, warning) exactly where base_train would refuse the batch."""
    from trainer.base_train import grad_accumulation

    try:
        return grad_accumulation(cfg["total_batch_size"], cfg["device_batch_size"], cfg["max_seq_len"], world), None
    except ValueError:
        per_step = cfg["device_batch_size"] * cfg["max_seq_len"] * world
        nearest = max(per_step, round(cfg["total_batch_size"] / per_step) * per_step)
        return None, (f"total_batch_size {cfg['total_batch_size']:,} is not a multiple of device_batch_size x "
                      f"max_seq_len x GPUs = {per_step:,}: the trainer will refuse it; use {nearest}")


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


def memory_per_device(cfg: dict, shape: dict, world: int, kind: str) -> dict:
    """Estimated peak bytes on one device during pretraining, by part."""
    adamw_state = 0
    for rows, cols in shape["adamw_shapes"]:
        # Sharded along dim 0 when it divides by the world (and is worth it), else whole on every rank.
        sharded = world > 1 and rows * cols >= 1024 and rows % world == 0
        adamw_state += 2 * 4 * (rows * cols // world if sharded else rows * cols)
    muon_state = muon_workspace = 0
    for dims, count in shape["muon_shapes"]:
        numel = math.prod(dims)
        per_rank = -(-count // world)  # each rank owns a block of ceil(K/W) same-shape matrices
        muon_state += 4 * per_rank * numel
        muon_workspace += 4 * per_rank * world * numel  # stacked, zero-padded fp32 gradients of the group
    tokens = cfg["device_batch_size"] * cfg["max_seq_len"]
    parts = {
        "weights": 4 * shape["params"],
        "gradients": 4 * shape["params"],
        "bf16_weight_copies": 2 * shape["linear_params"],
        "optimizer_state": adamw_state + muon_state,
        "optimizer_workspace": muon_workspace,
        "activations": tokens * ACTIVATION_BYTES_PER_TOKEN_WIDTH_LAYER * shape["width"] * cfg["depth"],
        "logits": tokens * LOGIT_BYTES_PER_TOKEN_VOCAB * cfg["vocab_size"],
        "runtime": RUNTIME_OVERHEAD_BYTES[kind],
    }
    return {k: float(v) for k, v in parts.items()}


def _largest_batch_that_fits(cfg: dict, shape: dict, world: int, kind: str, limit: float) -> int | None:
    """The largest power-of-two device_batch_size below the current one that fits and keeps the total batch whole."""
    dbs = cfg["device_batch_size"]
    while dbs > 1:
        dbs = 1 << ((dbs - 1).bit_length() - 1)  # next power of two below
        trial = {**cfg, "device_batch_size": dbs}
        if sum(memory_per_device(trial, shape, world, kind).values()) <= limit and \
                cfg["total_batch_size"] % (dbs * cfg["max_seq_len"] * world) == 0:
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
    """Estimate a resolved configuration (config.resolve) on `hardware` (a HARDWARE key). JSON-able.

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

    shape = _model_shape(depth, vocab, seq)
    fpt = shape["flops_per_token"]
    num_iterations, horizon_from = _horizon(cfg, depth, vocab, seq)
    if cfg["num_iterations"] == 0:
        warnings.append("num_iterations 0: base_train refuses it; use -1 to derive the steps from the tokens-per-parameter ratio")
    accum, batch_warning = _grad_accumulation(cfg, world)
    if batch_warning:
        warnings.append(batch_warning)
    tokens = num_iterations * cfg["total_batch_size"]
    train_flops = fpt * tokens
    throughput = devices * hw["peak_flops"] * hw["mfu"]  # model FLOP/s the whole job sustains

    # Pretraining: the optimizer steps, plus what the stage does around them.
    train_seconds = train_flops / throughput
    per_eval = max(1, cfg["eval_tokens"] // (cfg["device_batch_size"] * seq * world)) * cfg["device_batch_size"] * seq * world
    n_evals = _count_every(num_iterations, cfg["eval_every"], at_zero=cfg["eval_every"] > 0)
    eval_seconds = n_evals * per_eval * (fpt / 3) / throughput  # forward only: a third of training FLOPs
    n_samples = _count_every(num_iterations, cfg["sample_every"], at_zero=False)
    sample_seconds = n_samples * SAMPLE_FORWARDS * (depth * SECONDS_PER_LAYER_FORWARD + (fpt / 3) * 24 / (hw["peak_flops"] * hw["mfu"]))
    n_saves = _count_every(num_iterations, cfg["save_every"], at_zero=False)
    mem = memory_per_device(cfg, shape, world, kind)
    checkpoint_bytes = mem["weights"] + mem["optimizer_state"] * world
    save_seconds = n_saves * checkpoint_bytes / DISK_BYTES_PER_SECOND
    pretrain_seconds = STARTUP_SECONDS[kind] + train_seconds + eval_seconds + sample_seconds + save_seconds
    if eval_seconds > 0.2 * train_seconds:
        notes.append(f"validation takes {eval_seconds / train_seconds:.0%} of the training time: raise eval_every or lower eval_tokens")

    # Every selected stage, in pipeline order.
    ref_fpt = _model_shape(*REFERENCE_SHAPE)["flops_per_token"]
    stages = []
    for stage in cfg["stages"]:
        if stage == "tok_train":
            seconds, basis = TOK_TRAIN_STARTUP_SECONDS + cfg["tok_max_chars"] / TOK_TRAIN_CHARS_PER_SECOND, \
                f"{cfg['tok_max_chars']:,} characters at ~{TOK_TRAIN_CHARS_PER_SECOND / 1e6:.0f}M/s on CPU"
        elif stage == "tok_eval":
            seconds, basis = TOK_EVAL_SECONDS, "compression on a few MB per text domain"
        elif stage == "base_train":
            seconds = pretrain_seconds
            basis = (f"{num_iterations:,} steps at {hw['mfu']:.0%} MFU; {n_evals} validations, "
                     f"{n_saves} checkpoints, start-up and compilation")
        elif stage in OTHER_STAGES:
            ref_seconds, basis = OTHER_STAGES[stage]
            seconds = STARTUP_SECONDS[kind] + ref_seconds * (fpt / ref_fpt) * (REFERENCE_THROUGHPUT / throughput)
            basis = f"{basis}; rough allowance"
        else:
            continue
        stages.append({"stage": stage, "seconds": round(seconds, 1), "basis": basis})
    total_seconds = sum(s["seconds"] for s in stages)
    if "base_train" not in cfg["stages"]:
        notes.append("base_train is not selected: the pretraining numbers describe the model, not this run's time")

    # Money: the whole machine is rented for the whole pipeline, GPUs idle or not.
    device_hours = total_seconds / 3600 * devices
    cost = device_hours * hw["usd_per_hour"]

    # Memory.
    per_device = sum(mem.values())
    device_memory = _host_memory_bytes() if hw["memory_gb"] is None else hw["memory_gb"] * 1e9
    where = "this machine's RAM" if kind == "cpu" else f"the {hw['memory_gb']} GB of one {hw['short']}"
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
    ratio = tokens / shape["scaling_params"]
    if ratio < 5 or ratio > 100:
        notes.append(f"{ratio:.1f} tokens per parameter; compute-optimal training is ~20")

    result = {
        "preset": cfg.get("preset", ""),
        "hardware": hardware,
        "hardware_label": hw["label"],
        "devices": devices,
        "world_size": world,
        "peak_flops_per_device": hw["peak_flops"],
        "mfu": hw["mfu"],
        "usd_per_device_hour": hw["usd_per_hour"],
        "model": {"depth": depth, "width": shape["width"], "heads": shape["heads"], "kv_heads": shape["kv_heads"],
                  "head_dim": shape["head_dim"], "vocab_size": vocab, "seq_len": seq},
        "params": shape["params"],
        "scaling_params": shape["scaling_params"],
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
    est = estimate(cfg, args.hardware or default_hardware())
    print(json.dumps(est, indent=2) if args.json else format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
