"""A run's plan as plain arithmetic: the model's shape, the batch, the horizon, and the words for their problems.

    from pipeline import plan
    shape = plan.model_shape(depth=20, vocab_size=65536, seq_len=2048)
    shape.params, shape.flops_per_token                 # 560,988,160 and the FLOPs per trained token
    plan.grad_accumulation(524288, 32, 2048, world=8)   # 1 micro-step per optimizer step
    plan.horizon(-1, -1.0, 20.0, 524288, shape.flops_per_token, shape.scaling_params)  # (steps, basis)

The trainer and the pre-launch estimate take these numbers from here, so the estimate is the
trainer's own arithmetic: gpt/model.py derives its width and heads with `width_and_heads`,
trainer/base_train.py its accumulation and horizon with `grad_accumulation` and `horizon`, and
pipeline/estimate.py all of them (tests/test_plan.py builds the real GPT on the meta device and
checks every number). A setting that cannot work is worded once, below: `pipeline.config.validate`
judges a configuration with these messages, and a stage refusing a hand-typed command says the
same thing, with the names spelled as its flags (flags=True).

Torch-free, like the rest of `pipeline/`: the studio imports it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# The model family's defaults (trainer/base_train.py's flags and GPTConfig.from_depth use the same).
ASPECT_RATIO = 64  # width per layer of depth
HEAD_DIM = 128  # attention head dimension
WINDOW_PATTERN = "L"  # every layer sees the whole context
# The two matrices gpt.optim.build_optimizer gives AdamW; every matrix inside the blocks gets Muon.
ADAMW_PARAMETERS = ("lm_head.weight", "transformer.wte.weight")

# How the messages name a setting: as the configuration does, or as a stage's command-line flag.
_FIELDS = {"total": "total_batch_size", "device": "device_batch_size", "seq": "max_seq_len",
           "derive": "target_param_data_ratio"}
_FLAGS = {"total": "--total-batch-size", "device": "--device-batch-size", "seq": "--max-seq-len",
          "derive": "--target-flops or --target-param-data-ratio"}


# ---------------------------------------------------------------------------
# Messages


def at_least(minimum: float, value) -> str:
    """The one wording of a number below its minimum; the caller names the setting (`depth`, `--depth`)."""
    return f"must be at least {minimum:g}, got {value}"


def batch_mismatch(total_batch: int, device_batch: int, seq_len: int, world: int, flags: bool = False) -> str | None:
    """Why `total_batch` tokens are not a whole number of micro-steps, with the fix; None when they are.

    A micro-step is device_batch rows of seq_len tokens on each of `world` processes; gradient
    accumulation makes the global batch out of whole micro-steps. flags=True names the command-line
    flags (--total-batch-size) instead of the configuration's settings (total_batch_size).
    """
    per_step = device_batch * seq_len * world
    if total_batch % per_step == 0:
        return None
    n = _FLAGS if flags else _FIELDS
    lower = total_batch // per_step * per_step
    use = f"{lower} or {lower + per_step}" if lower else f"{per_step}"
    return (f"{total_batch} tokens is not a multiple of {n['seq']} x {n['device']} x GPUs = {per_step}; "
            f"use e.g. {n['total']} {use}, or change {n['device']}")


def horizon_problem(num_iterations: int, target_flops: float, target_param_data_ratio: float,
                    flags: bool = False) -> str | None:
    """Why these settings give no number of steps to train (said of num_iterations); None when they do."""
    n = _FLAGS if flags else _FIELDS
    if num_iterations == 0:
        return f"0 steps would train nothing; give a number of steps, or -1 to derive them from {n['derive']}"
    if num_iterations < 0 and target_flops <= 0 and target_param_data_ratio <= 0:
        return (f"{num_iterations} derives the steps from {n['derive']}, but {'neither is' if flags else 'it is not'} positive; "
                f"give a number of steps or a positive {n['derive']}")
    return None


# ---------------------------------------------------------------------------
# Batch and horizon


def grad_accumulation(total_batch: int, device_batch: int, seq_len: int, world: int, flags: bool = False) -> int:
    """Micro-steps per optimizer step on each process; ValueError (batch_mismatch) when the batch does not divide."""
    problem = batch_mismatch(total_batch, device_batch, seq_len, world, flags)
    if problem:
        raise ValueError(problem)
    return total_batch // (device_batch * seq_len * world)


def horizon(num_iterations: int, target_flops: float, target_param_data_ratio: float, total_batch_size: int,
            flops_per_token: float, scaling_params: int) -> tuple[int, str]:
    """(optimizer steps, where they come from): num_iterations when positive, else the FLOPs budget
    target_flops when positive, else target_param_data_ratio training tokens per scaling parameter."""
    if num_iterations > 0:
        return num_iterations, "num-iterations"
    if target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
        return max(1, steps), f"target-flops {target_flops:.3g}"
    tokens = target_param_data_ratio * scaling_params
    return max(1, round(tokens / total_batch_size)), f"ratio {target_param_data_ratio} tokens/param"


# ---------------------------------------------------------------------------
# The model's shape


def width_and_heads(depth: int, aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM,
                    n_kv_head: int | None = None) -> tuple[int, int, int]:
    """(width, query heads, key/value heads) of the model family: width = depth x aspect_ratio, rounded
    up to whole heads of head_dim (d25: 1600 -> 1664); one key/value head per query head by default."""
    if depth < 1:
        raise ValueError(f"depth {at_least(1, depth)}")
    if aspect_ratio < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"aspect_ratio must be >= 1 and head_dim a positive even number, got {aspect_ratio} and {head_dim}")
    # Rounding up (not down) keeps every head exactly head_dim wide.
    width = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = width // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
        raise ValueError(f"n_kv_head {n_kv_head} must divide the {n_head} query heads of depth {depth}; pick one of {divisors}")
    return width, n_head, n_kv_head


def short_window(seq_len: int) -> int:
    """Keys a short (S) layer sees: a quarter of the context, rounded up to a multiple of 128 (512 at 2048).

    For contexts up to 512 the quarter is used as is, so short test models still have a real window.
    """
    quarter = -(-seq_len // 4)
    return quarter if quarter <= 128 else -(-quarter // 128) * 128


def window_sizes(window_pattern: str, n_layer: int, seq_len: int) -> list[int]:
    """Per layer, how many keys (the query's own position included) each query may attend to.

    The pattern of L (full context) and S (short window) is tiled over the layers; the last layer
    always sees the whole context. The pattern is assumed valid (GPTConfig checks it).
    """
    pattern = window_pattern.upper()
    sizes = [seq_len if pattern[i % len(pattern)] == "L" else short_window(seq_len) for i in range(n_layer)]
    sizes[-1] = seq_len
    return sizes


def parameter_shapes(vocab_size: int, n_layer: int, width: int, kv_width: int) -> dict[str, tuple[int, int]]:
    """Every parameter of gpt.model.GPT as named_parameters() lists it: untied embedding and head, and per
    block q, k, v and output projections and a 4x ReLU² MLP (no biases; the norms have no weights)."""
    shapes = {"transformer.wte.weight": (vocab_size, width)}
    for i in range(n_layer):
        block = f"transformer.h.{i}"
        shapes.update({
            f"{block}.attn.c_q.weight": (width, width),
            f"{block}.attn.c_k.weight": (kv_width, width),
            f"{block}.attn.c_v.weight": (kv_width, width),
            f"{block}.attn.c_proj.weight": (width, width),
            f"{block}.mlp.c_fc.weight": (4 * width, width),
            f"{block}.mlp.c_proj.weight": (width, 4 * width),
        })
    shapes["lm_head.weight"] = (vocab_size, width)
    return shapes


@dataclass(frozen=True)
class ModelShape:
    """The numbers of one model that the estimate needs (all plain ints, except flops_per_token)."""

    depth: int
    vocab_size: int
    seq_len: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    params: int  # every parameter
    scaling_params: int  # all but the embedding lookup (Kaplan-style, for the tokens-per-parameter horizon)
    linear_params: int  # weights of every Linear (lm_head included): what autocast keeps bf16 copies of
    flops_per_token: float  # training FLOPs per token, as GPT.flops_per_token counts them
    adamw_shapes: tuple[tuple[int, int], ...]  # the AdamW matrices, in ADAMW_PARAMETERS order
    muon_shapes: tuple[tuple[tuple[int, int], int], ...]  # (shape, how many), sorted by shape: one Muon group each


@functools.lru_cache(maxsize=256)
def model_shape(depth: int, vocab_size: int, seq_len: int, aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM,
                n_kv_head: int | None = None, window_pattern: str = WINDOW_PATTERN) -> ModelShape:
    """The shape of GPTConfig.from_depth(depth, vocab_size, seq_len, ...)'s GPT, counted without building it.

    FLOPs per token: 6 x the weights of every Linear (forward + backward) plus, per layer,
    12 x heads x head_dim x keys seen for QK^T and AV; the embedding is a lookup (free), and causal
    masking is not discounted (the usual MFU convention).
    """
    width, heads, kv_heads = width_and_heads(depth, aspect_ratio, head_dim, n_kv_head)
    shapes = parameter_shapes(vocab_size, depth, width, kv_heads * head_dim)
    params = sum(rows * cols for rows, cols in shapes.values())
    linear = params - vocab_size * width  # everything but the embedding is a Linear weight
    attention = sum(12 * heads * head_dim * min(w, seq_len) for w in window_sizes(window_pattern, depth, seq_len))
    muon: dict[tuple[int, int], int] = {}
    for name, shape in shapes.items():
        if name not in ADAMW_PARAMETERS:
            muon[shape] = muon.get(shape, 0) + 1
    return ModelShape(
        depth=depth, vocab_size=vocab_size, seq_len=seq_len, width=width, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, params=params, scaling_params=linear, linear_params=linear,
        flops_per_token=float(6 * linear + attention),
        adamw_shapes=tuple(shapes[name] for name in ADAMW_PARAMETERS),
        muon_shapes=tuple(sorted(muon.items())),
    )
