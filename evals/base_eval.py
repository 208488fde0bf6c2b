"""Stage 4: evaluate the base model: CORE, validation bits per byte, sample completions.

One GPU or CPU:
    python -m evals.base_eval --run-dir runs/demo
    python -m evals.base_eval --run-dir runs/demo --step 2000 --tasks core --max-per-task 100
Eight GPUs (the CORE examples and the validation batches are striped over the ranks):
    torchrun --standalone --nproc_per_node=8 -m evals.base_eval --run-dir runs/demo

Loads the latest base_train checkpoint of the run (or --step N) and the run's tokenizer.
--tasks is a comma list of: core (all 22 CORE tasks), bpb, samples, or single CORE task
labels (arc_easy, winograd, ...: CORE over just those). A CORE task whose data file is
nowhere (tasks/core.py says where it looks) is reported and left out; the score is then
labelled "CORE (18/22)" etc., since only the 22-task mean compares with published ones
(GPT-2 124M 0.1139, GPT-2 XL 0.2565).

Writes events (stage "base_eval"): one `eval` per CORE task {name: the task's label,
suite: "core", accuracy, centered, count, seconds}, one `eval` {name: "CORE", value}
(the report card's BASE column), `eval` {name: "val_bpb"}, a `sample` event and a `result`
{core, core_label, core_tasks, core_missing, val_bpb, ...}. Every example's outcome goes to
<run-dir>/evals/base_eval/<task>.jsonl (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline import checkpoints, dataset
from pipeline.events import EventWriter
from pipeline.harness import Stage
from tasks import core as core_tasks

STAGE = "base_eval"
SOURCE = "base_train"  # the stage whose checkpoints are evaluated
GROUPS = ("core", "bpb", "samples")
RECORDS_DIR = Path("evals") / STAGE


def parse_tasks(text: str) -> tuple[list[str], list[str]]:
    """--tasks -> (groups among core/bpb/samples, CORE task labels); ValueError names the choices."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS and n not in core_tasks.BY_LABEL]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; use {', '.join(GROUPS)} or CORE task labels: "
                         f"{', '.join(core_tasks.BY_LABEL)}")
    if not names:
        raise ValueError(f"give at least one of {', '.join(GROUPS)}")
    groups = [g for g in GROUPS if g in names]
    labels = [t.label for t in core_tasks.TASKS if "core" in names or t.label in names]
    return groups + (["core"] if labels and "core" not in groups else []), labels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a run's base model: CORE, bits per byte, samples.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory (with tokenizer/ and checkpoints/base_train/)")
    p.add_argument("--step", type=int, default=None, help="the base_train checkpoint step to evaluate (default: the latest)")
    p.add_argument("--tasks", default="core,bpb,samples",
                   help="comma list: core, bpb, samples, or CORE task labels (e.g. arc_easy,winograd)")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task after the shuffle (-1 or 0: all)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens for bits per byte")
    p.add_argument("--device-batch-size", type=int, default=32,
                   help="rows per forward, in units of the model's context (CORE packs shorter sequences more densely)")
    p.add_argument("--data-source", default="fineweb-edu", choices=sorted(dataset.SOURCES), help="corpus of the validation shard")
    p.add_argument("--data-dir", default=None, help="your own prepared shards instead (the last one is the validation shard)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="where to evaluate")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="autocast compute dtype")
    args = p.parse_args(argv)
    try:
        parse_tasks(args.tasks)
    except ValueError as e:
        p.error(f"--tasks: {e}")
    for name in ("eval_tokens", "device_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def write_records(run_dir, label: str, records: list[dict]) -> Path:
    """<run-dir>/evals/base_eval/<label>.jsonl, whole or not at all (temporary name, then rename)."""
    path = Path(run_dir) / RECORDS_DIR / f"{label}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def run_core(args, labels: list[str], model, tok, ctx, events, step: int) -> dict:
    """Every selected CORE task: an eval event each, the records files, and the CORE score."""
    from evals import core as core_eval

    def forward(ids):
        with ctx.autocast():
            return model(ids)

    max_len = model.config.sequence_len
    budget = args.device_batch_size * max_len
    centered, missing, results = {}, {}, []
    t0 = time.time()
    for label in labels:
        task = core_tasks.get(label)
        t_task = time.time()
        try:
            examples = core_tasks.select(core_tasks.load(task), args.max_per_task)
            if not examples:
                raise core_tasks.TaskMissing(f"{task.path} has no examples")
        except core_tasks.TaskMissing as e:
            missing[label] = str(e)
            say(ctx, f"{label:<34} missing: {e}")
            continue
        result = core_eval.evaluate_task(forward, tok, task, examples, max_len=max_len, token_budget=budget,
                                         device=ctx.device, rank=ctx.rank, world_size=ctx.world_size)
        result.seconds = round(time.time() - t_task, 3)  # with reading the file
        for record in result.records:
            record["step"] = step
        if ctx.master:
            write_records(args.run_dir, label, result.records)
        centered[label] = result.centered
        results.append(result)
        events.emit("eval", name=label, suite="core", step=step, task_type=task.kind, shots=task.shots,
                    accuracy=round(result.accuracy, 6), centered=round(result.centered, 6), count=result.count,
                    random_baseline=task.baseline, seconds=result.seconds, forwards=result.forwards)
        say(ctx, f"{label:<34} accuracy {result.accuracy:.4f} | centered {result.centered:+.4f} | "
                 f"{result.count} examples, {result.forwards} forwards | {result.seconds:.1f}s")
    seconds = time.time() - t0
    score, label = core_tasks.core_score(centered)
    examples = sum(r.count for r in results)
    out = {"core": score, "core_label": label, "core_tasks": len(centered), "core_missing": sorted(missing),
           "core_examples": examples, "core_seconds": round(seconds, 3),
           "core_examples_per_second": round(examples / seconds, 1) if seconds > 0 else None}
    if score is not None:
        fields = {"coverage": f"{len(centered)}/{len(core_tasks.TASKS)}"} if len(centered) < len(core_tasks.TASKS) else {}
        events.emit("eval", name="CORE", value=round(score, 6), label=label, tasks=len(centered),
                    missing=sorted(missing), step=step, seconds=round(seconds, 3), **fields)
        say(ctx, f"{label}: {score:.4f} over {examples} examples in {seconds:.1f}s ({out['core_examples_per_second']}/s)")
    else:
        say(ctx, "CORE: no task could be evaluated (" + "; ".join(missing.values()) + ")")
    return out


def run_bpb(args, model, tok, ctx, events, step: int) -> float:
    import torch

    from gpt.data import val_batches
    from gpt.loss_eval import evaluate_bpb

    t0 = time.time()
    shards = dataset.pretrain_shards(args.data_source, 1, args.data_dir)
    token_bytes = torch.tensor(tok.token_bytes, dtype=torch.int64, device=ctx.device)
    batches = val_batches([shards.val], tok, args.device_batch_size, model.config.sequence_len, args.eval_tokens,
                          rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    bpb = evaluate_bpb(model, batches, token_bytes, ctx)
    events.emit("eval", name="val_bpb", step=step, val_bpb=bpb, seconds=round(time.time() - t0, 3), data_origin=shards.origin)
    say(ctx, f"val_bpb: {bpb:.4f} ({time.time() - t0:.1f}s)")
    return bpb


def evaluate(args, ctx, events) -> dict:
    from gpt.checkpoint import load_for_inference
    from gpt.tokenizer import Tokenizer

    tok_file = Path(args.run_dir) / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} not found; run the tok_train stage first")
    path = checkpoints.find(args.run_dir, SOURCE, args.step)  # FileNotFoundError naming the steps there are
    tok = Tokenizer.from_dir(args.run_dir)
    model, meta = load_for_inference(path, ctx.device)
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"the checkpoint's vocabulary ({model.config.vocab_size}) is smaller than the run's tokenizer "
                         f"({tok.vocab_size}): it was trained with another tokenizer")
    step = meta.get("step")
    events.emit("setup", checkpoint=str(path), step=step, model_config=model.config.to_dict(), params=model.num_params(),
                world_size=ctx.world_size, device=ctx.device_name, dtype=str(ctx.dtype).replace("torch.", ""))
    say(ctx, f"evaluating {path} (step {step}) on {ctx.world_size} x {ctx.device_name}")
    groups, labels = parse_tasks(args.tasks)
    result = {"step": step, "checkpoint": str(path)}
    t0 = time.time()
    if "core" in groups:
        result.update(run_core(args, labels, model, tok, ctx, events, step))
    if "bpb" in groups:
        result["val_bpb"] = run_bpb(args, model, tok, ctx, events, step)
    if "samples" in groups and ctx.master:
        from gpt.loss_eval import sample_completions

        events.emit("sample", step=step, samples=sample_completions(model, tok, ctx))
    result["seconds"] = round(time.time() - t0, 3)
    return result


def say(ctx, message: str):
    if ctx.master:
        print(message, flush=True)


def main(argv=None):
    args = parse_args(argv)
    with Stage(STAGE) as stage:
        from gpt import common

        ctx = common.setup(args.device, args.dtype)
        stage.start(EventWriter(args.run_dir, STAGE, enabled=ctx.master), args=vars(args), world_size=ctx.world_size)
        result = evaluate(args, ctx, stage.events)
        stage.events.emit("result", **result)
    return stage.exit_code


if __name__ == "__main__":
    sys.exit(main())
