"""What base_train and base_eval both measure on a base model: bits per byte, and sample completions.

    bpb = evaluate_bpb(model, val_batches(...), token_bytes, ctx)     # all-reduced over ranks
    samples = sample_completions(model, tokenizer, ctx)                 # [{prompt, completion}], greedy

Bits per byte is the validation loss made independent of the tokenizer: the summed loss of
every target token, in nats, over ln 2 times the UTF-8 bytes those tokens stand for. Special
tokens (0 bytes, e.g. BOS as a target) and ignored targets (-1) count in neither sum.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

SAMPLE_PROMPTS = [
    "The capital of France is",
    "Water is made of hydrogen and",
    "If today is Monday, then the day after tomorrow is",
    "The opposite of cold is",
    "Once upon a time, there was a",
    "The largest planet in our solar system is",
]


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, ctx) -> float:
    """Bits per byte over (inputs, targets) batches, summed over every rank; NaN when no target has bytes."""
    nats = torch.zeros((), dtype=torch.float64, device=ctx.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for x, y in batches:
        with ctx.autocast():
            loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0).double()
        counted = b > 0
        nats += (loss * counted).sum()
        nbytes += b.sum()
    if ctx.distributed:
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    if nbytes.item() == 0:
        return float("nan")
    return nats.item() / (math.log(2) * nbytes.item())


@torch.no_grad()
def sample_completions(model, tokenizer, ctx, prompts=SAMPLE_PROMPTS, max_tokens: int = 16) -> list[dict]:
    """Greedy completions of fixed prompts ({prompt, completion} each), for a look at what the model says."""
    samples = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
        with ctx.autocast():
            out = model.generate(ids, max_tokens=max_tokens, temperature=0.0)
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out)})
    return samples
