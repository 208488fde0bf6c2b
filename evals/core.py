"""Scoring a base model on the CORE tasks (tasks/core.py): prompts, batched forwards, the three rules.

    from evals import core
    result = core.evaluate_task(forward, tokenizer, task, examples, max_len=2048, token_budget=32 * 2048)
    result.accuracy, result.centered, result.count, result.records

`forward(ids)` maps a (B, T) int64 batch to (B, T, vocab) logits (a model under autocast);
`tokenizer` needs `bos_id`, `batch_encode(texts, prepend=)` and `decode(ids)` (gpt/tokenizer.py).

Prompts (few-shot examples first, each followed by a blank line, then the item; BOS first):
    multiple choice    "{query}{delim}{choices[gold]}\\n\\n" per shot, then "{query}{delim}{choice}" per choice
    schema             "{context_options[gold]}{delim}{continuation}\\n\\n" per shot,
                       then "{option}{delim}{continuation}" per context option
    language modelling "{context.strip()}{delim}{continuation}\\n\\n" per shot, then
                       "{context.strip()}{delim}{continuation}"; the prompt without the item's
                       continuation is stripped of surrounding whitespace (a trailing space would
                       be its own token, while in the full prompt it joins the next word)

Each prompt is tokenised whole. The continuation is what differs: for multiple choice the
tokens after the prompts' longest common prefix, for schema the longest common suffix, for
language modelling the tokens after the prompt without the continuation. Scoring:
    multiple choice, schema   the prompt whose continuation has the lowest mean token loss wins;
                              correct when it is the gold one
    language modelling        correct when greedy decoding (argmax at every position) reproduces
                              every continuation token
A sequence longer than the model's context loses tokens on the left (few-shot text first).

Batched: the sequences of every example (every choice) of a task are sorted by length and
packed into padded batches of up to `token_budget` tokens (rows x longest row), so one forward
scores many examples; padding sits on the right, where causal attention cannot see it. Under
torch.distributed, example i goes to rank i % world_size, and the counts are summed with
all_reduce; rank 0 gathers the per-example records.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks import core as core_tasks
from tasks.core import LANGUAGE_MODELING, MULTIPLE_CHOICE, SCHEMA, CoreTask


# --- prompts -----------------------------------------------------------------------------------

def render_prompts(task: CoreTask, item: dict, fewshot: list[dict]) -> list[str]:
    """The prompts of one example: one per choice (multiple choice), per context option (schema),
    or [without continuation, with continuation] (language modelling). See the module docstring."""
    d = task.delimiter
    if task.kind == MULTIPLE_CHOICE:
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.kind == SCHEMA:
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{option}{d}{item['continuation']}" for option in item["context_options"]]
    if task.kind == LANGUAGE_MODELING:
        shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{shots}{item['context'].strip()}{d}"
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown CORE task type {task.kind!r}; one of {', '.join(core_tasks.KINDS)}")


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs: list[list[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def continuation_spans(kind: str, token_lists: list[list[int]]) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) of each sequence to score: tokens[start:end] is its continuation.

    Language modelling gives one sequence (the full prompt) from its two prompts. A continuation
    is never empty, and never starts at position 0 (BOS, which nothing predicts).
    """
    if kind == LANGUAGE_MODELING:
        without, full = token_lists
        start = len(without) if full[:len(without)] == without else _common_prefix([without, full])
        return [(full, max(1, min(start, len(full) - 1)), len(full))]
    if kind == MULTIPLE_CHOICE:
        common = _common_prefix(token_lists) if len(token_lists) > 1 else len(token_lists[0]) - 1
        return [(t, max(1, min(common, len(t) - 1)), len(t)) for t in token_lists]
    if kind == SCHEMA:
        common = _common_suffix(token_lists) if len(token_lists) > 1 else len(token_lists[0]) - 1
        return [(t, max(1, len(t) - common), len(t)) for t in token_lists]
    raise ValueError(f"unknown CORE task type {kind!r}")


def crop_left(tokens: list[int], start: int, end: int, max_len: int) -> tuple[list[int], int, int, int]:
    """Keep the last `max_len` tokens; (tokens, start, end, tokens dropped). The continuation keeps
    at least one token before it (a continuation longer than the context is scored on what fits)."""
    drop = max(0, len(tokens) - max_len)
    if drop == 0:
        return tokens, start, end, 0
    return tokens[drop:], max(1, start - drop), end - drop, drop


# --- batched scoring ---------------------------------------------------------------------------

@dataclass
class Scored:
    mean_loss: float  # mean loss over the continuation's tokens
    exact: bool  # greedy decoding reproduces every continuation token
    predicted: list[int]  # the greedy tokens at the continuation's positions


def plan_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices of the sequences, longest first, in batches whose rows x longest row fit `token_budget` (>= 1 row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > token_budget:
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


@torch.no_grad()
def score_sequences(forward, seqs: list[tuple[list[int], int, int]], token_budget: int, pad_id: int,
                    device="cpu") -> tuple[list[Scored], int]:
    """Mean continuation loss and greedy exactness of every (tokens, start, end); also the forwards run."""
    out: list[Scored | None] = [None] * len(seqs)
    batches = plan_batches([len(t) for t, _, _ in seqs], token_budget)
    for batch in batches:
        T = len(seqs[batch[0]][0])
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens = seqs[i][0]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        # Only the positions that predict a continuation token matter (position p predicts token p + 1):
        # the loss and argmax are taken there alone, not over the whole (B, T, vocab) logits.
        rows, positions = [], []
        for row, i in enumerate(batch):
            _, start, end = seqs[i]
            rows += [row] * (end - start)
            positions += range(start - 1, end - 1)
        rows_t, pos_t = torch.tensor(rows), torch.tensor(positions)
        ids = ids.to(device)
        logits = forward(ids)
        picked = logits[rows_t.to(logits.device), pos_t.to(logits.device)].float()
        targets = ids[rows_t.to(ids.device), pos_t.to(ids.device) + 1]
        losses = F.cross_entropy(picked, targets, reduction="none").cpu().tolist()
        greedy = picked.argmax(dim=-1).cpu().tolist()
        k = 0
        for i in batch:
            tokens, start, end = seqs[i]
            n = end - start
            pred = greedy[k:k + n]
            out[i] = Scored(mean_loss=math.fsum(losses[k:k + n]) / n, exact=pred == tokens[start:end], predicted=pred)
            k += n
    return out, len(batches)


def grade(kind: str, gold, scored: list[Scored]) -> tuple[bool, int | None]:
    """(correct, predicted choice) of one example from its scored sequences (None for language modelling)."""
    if kind == LANGUAGE_MODELING:
        return scored[0].exact, None
    losses = [s.mean_loss for s in scored]
    predicted = min(range(len(losses)), key=losses.__getitem__)  # the first of equal losses
    return predicted == gold, predicted


# --- one task ----------------------------------------------------------------------------------

@dataclass
class TaskResult:
    label: str
    kind: str
    shots: int
    baseline: float  # percent
    correct: int  # summed over ranks
    count: int  # examples, summed over ranks
    seconds: float
    forwards: int = 0  # this rank's
    sequences: int = 0  # this rank's
    records: list[dict] = field(default_factory=list)  # rank 0: every example's, by index; other ranks: []

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    @property
    def centered(self) -> float:
        return core_tasks.centered(self.accuracy, self.baseline)


def evaluate_task(forward, tokenizer, task: CoreTask, examples: list[dict], *, max_len: int, token_budget: int,
                  device="cpu", rank: int = 0, world_size: int = 1) -> TaskResult:
    """Score `examples` (already selected: tasks.core.select) of `task`; see the module docstring.

    With world_size > 1 every rank must call this with the same examples (torch.distributed up).
    """
    t0 = time.time()
    mine = list(range(rank, len(examples), world_size))
    prompts, owners, fewshots = [], [], {}
    for i in mine:
        fewshots[i] = core_tasks.fewshot_indices(i, len(examples), task.shots)
        rendered = render_prompts(task, examples[i], [examples[j] for j in fewshots[i]])
        prompts += rendered
        owners += [i] * len(rendered)
    encoded = tokenizer.batch_encode(prompts, prepend=tokenizer.bos_id) if prompts else []
    per_example: dict[int, list[list[int]]] = {}
    for i, tokens in zip(owners, encoded):
        per_example.setdefault(i, []).append(tokens)

    seqs, seq_owner, dropped = [], [], {}
    for i in mine:
        for tokens, start, end in continuation_spans(task.kind, per_example[i]):
            tokens, start, end, drop = crop_left(tokens, start, end, max_len)
            seqs.append((tokens, start, end))
            seq_owner.append(i)
            dropped[i] = max(dropped.get(i, 0), drop)
    scored, forwards = score_sequences(forward, seqs, token_budget, tokenizer.bos_id, device) if seqs else ([], 0)
    by_example: dict[int, list[int]] = {}
    for k, i in enumerate(seq_owner):
        by_example.setdefault(i, []).append(k)

    records, correct = [], 0
    for i in mine:
        item = examples[i]
        ks = by_example[i]
        ok, predicted = grade(task.kind, item.get("gold"), [scored[k] for k in ks])
        correct += ok
        record = {"index": i, "correct": bool(ok), "fewshot": fewshots[i],
                  "tokens": [len(seqs[k][0]) for k in ks], "cropped": dropped[i]}
        if task.kind == LANGUAGE_MODELING:
            tokens, start, end = seqs[ks[0]]
            record.update(gold=item["continuation"], predicted=tokenizer.decode(scored[ks[0]].predicted),
                          continuation_tokens=end - start)
        else:
            record.update(gold=item["gold"], predicted=predicted, losses=[round(scored[k].mean_loss, 5) for k in ks])
        record["item"] = item
        records.append(record)

    count = len(mine)
    if world_size > 1:
        totals = torch.tensor([correct, count], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        correct, count = int(totals[0].item()), int(totals[1].item())
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(records, gathered, dst=0)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"]) if rank == 0 else []
    return TaskResult(task.label, task.kind, task.shots, task.baseline, correct, count, round(time.time() - t0, 3),
                      forwards=forwards, sequences=len(seqs), records=records)
