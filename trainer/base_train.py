"""Stage 3: pretrain the base GPT on packed web text.

One GPU or CPU:
    python -m trainer.base_train --run-dir runs/demo --depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 2048
Eight GPUs (one process each; no DDP wrapper, the optimizer shards its state and averages gradients):
    torchrun --standalone --nproc_per_node=8 -m trainer.base_train --run-dir runs/demo --depth 20
Several nodes: the same command under `torchrun --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT ...`.

The run directory must already hold tokenizer/ (stage tok_train). Horizon:
--num-iterations, else --target-flops, else --target-param-data-ratio tokens per
(scaling) parameter. The global batch --total-batch-size is reached by gradient
accumulation, so 1 and 8 GPUs train the same model up to rounding.

Writes events (stage "base_train") to <run-dir>/events.jsonl and checkpoints to
<run-dir>/checkpoints/base_train/. --resume continues from the latest whole
checkpoint exactly (model, optimizer shards, loader position, loop state), on
any number of ranks that divides its data streams (ranks x accumulation steps):
the accumulation is adjusted so the global batch and the batches stay the same.
SIGTERM or Ctrl-C saves a checkpoint and exits with code 75.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import checkpoints
from pipeline import dataset
from pipeline import plan
from gpt import checkpoint, common
from gpt.loss_eval import evaluate_bpb, sample_completions
from pipeline.events import EventWriter
from pipeline.harness import STOP, Stage

STAGE = "base_train"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the base model of a run.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run directory (with tokenizer/)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="transformer layers; width = 64 x depth rounded up to the head dim")
    g.add_argument("--aspect-ratio", type=int, default=64, help="width per layer of depth")
    g.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    g.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for grouped-query attention (default: one per query head)")
    g.add_argument("--window-pattern", default="L", help="per-layer attention windows, tiled: L full, S short (last layer always L)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    g = p.add_argument_group("batch and horizon")
    g.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per micro-step")
    g.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step across all ranks")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --target-flops or the ratio)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: use the ratio)")
    g.add_argument("--target-param-data-ratio", type=float, default=20.0, help="training tokens per scaling parameter")
    g = p.add_argument_group("optimizer")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate for the transformer matrices")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW learning rate for the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW learning rate for the output head")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay for the Muon matrices")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup steps")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps at the end with a linear decay")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="learning rate at the end, as a fraction of the peak")
    g = p.add_argument_group("data")
    g.add_argument("--data-source", default="fineweb-edu", choices=sorted(dataset.SOURCES), help="upstream corpus")
    g.add_argument("--data-dir", default=None, help="your own prepared shards (python -m gpt.data prepare)")
    g.add_argument("--num-shards", type=int, default=240, help="training shards to use (the validation shard is extra)")
    g.add_argument("--loader-threads", type=int, default=2, help="background tokenizer threads per rank")
    g = p.add_argument_group("evaluation, samples and checkpoints")
    g.add_argument("--eval-every", type=int, default=250, help="validation bits-per-byte every N steps (0: only at the end)")
    g.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
    g.add_argument("--sample-every", type=int, default=2000, help="greedy sample completions every N steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this stage")
    g.add_argument("--stop-after-step", type=int, default=-1,
                   help="pause after this step as if SIGTERM arrived (save, exit 75); resume later with --resume")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"], help="where to train")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="autocast compute dtype")
    g.add_argument("--compile", default="auto", choices=["auto", "yes", "no"], help="torch.compile the model (auto: on GPU, and on CPU when a C++ compiler is present)")
    g.add_argument("--seed", type=int, default=42, help="initialisation seed")
    g.add_argument("--log-every", type=int, default=1, help="write a metric event every N steps")
    args = p.parse_args(argv)
    for name in ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "head_dim", "aspect_ratio"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {plan.at_least(1, getattr(args, name))}")
    problem = plan.horizon_problem(args.num_iterations, args.target_flops, args.target_param_data_ratio, flags=True)
    if problem:
        p.error(f"--num-iterations: {problem}")
    return args


def grad_accumulation(total_batch: int, device_batch: int, seq_len: int, world: int) -> int:
    """Micro-steps per optimizer step (pipeline.plan); a batch that does not divide is refused in this command's flags."""
    return plan.grad_accumulation(total_batch, device_batch, seq_len, world, flags=True)


def data_streams(saved_args: dict) -> int:
    """Micro-batch streams a run's data is striped over: ranks x accumulation steps = global batch / row batch."""
    return saved_args["total_batch_size"] // (saved_args["device_batch_size"] * saved_args["max_seq_len"])


def check_resume_world(meta: dict, args, world: int) -> None:
    """Refuse a resume that cannot see the checkpoint's batches, naming the rank counts that can."""
    saved = meta["args"]
    for flag in ("device_batch_size", "max_seq_len", "total_batch_size"):
        if getattr(args, flag) != saved[flag]:
            raise RuntimeError(f"--resume: the checkpoint was trained with --{flag.replace('_', '-')} {saved[flag]}, this run "
                               f"has {getattr(args, flag)}; resume with the same value (the data position is kept per micro-batch stream)")
    streams = data_streams(saved)
    if streams % world:
        valid = ", ".join(str(w) for w in range(1, streams + 1) if streams % w == 0)
        raise RuntimeError(f"--resume: the checkpoint's data is striped over {streams} micro-batch streams "
                           f"({meta.get('world_size', 1)} ranks x {streams // meta.get('world_size', 1)} accumulation steps); "
                           f"resume on a number of ranks that divides {streams}: {valid} (this run has {world})")


def resumed_streams(saved: list[dict | None], rank: int, accum: int) -> list[dict]:
    """This rank's `accum` loader states, taken from those of every rank that saved the checkpoint.

    Stream s is fed by rank s // accum at micro-step s % accum on every layout, and the saved ranks'
    lists, concatenated in rank order, are the streams in order. So 2 ranks x 1 and 1 rank x 2 (or
    any other split) continue exactly the same streams.
    """
    states = []
    for r, state in enumerate(saved):
        if not state or "streams" not in state:
            raise RuntimeError(f"--resume: the checkpoint has no data position for rank {r} (loader_rank{r}.json); "
                               "resume from another checkpoint")
        states += state["streams"]
    if len(states) % accum:
        raise RuntimeError(f"--resume: the checkpoint has {len(states)} data streams, which {accum} accumulation steps "
                           "per rank do not divide; keep the batch settings")
    return states[rank * accum:(rank + 1) * accum]


def train(args, ctx, stage: Stage) -> str:
    """Train to the horizon; "interrupted" if asked to stop first (stage.stop_requested), with a checkpoint saved."""
    events = stage.events
    from gpt.data import PretrainLoader, val_batches
    from gpt.model import GPTConfig, build_model
    from gpt.optim import build_optimizer, lr_multiplier, muon_momentum, weight_decay_at
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.run_dir)
    config = GPTConfig.from_depth(args.depth, tok.vocab_size, sequence_len=args.max_seq_len, aspect_ratio=args.aspect_ratio,
                                  head_dim=args.head_dim, n_kv_head=args.n_kv_head, window_pattern=args.window_pattern)
    model = build_model(config, ctx.device)
    optimizer = build_optimizer(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay)
    ckpt_root = checkpoints.stage_dir(args.run_dir, STAGE)
    resume_from, skipped = None, []
    if args.resume:
        resume_from, skipped = checkpoints.latest_resumable(ckpt_root)
        if resume_from is None:
            raise RuntimeError(f"--resume: no checkpoint in {ckpt_root} has every file a resume needs; start without --resume"
                               + (f" (skipped damaged {', '.join(p.name for p, _ in skipped)})" if skipped else ""))
        # before grad_accumulation, whose advice (change the batch) would be wrong for a resume
        check_resume_world(checkpoints.read_meta(resume_from), args, ctx.world_size)
    accum = grad_accumulation(args.total_batch_size, args.device_batch_size, args.max_seq_len, ctx.world_size)
    num_iterations, horizon_from = plan.horizon(args.num_iterations, args.target_flops, args.target_param_data_ratio,
                                                args.total_batch_size, model.flops_per_token(), model.num_scaling_params())
    flops_per_token = model.flops_per_token()
    peak = common.peak_flops(ctx.device_name) if ctx.device_type == "cuda" else None

    shards = dataset.pretrain_shards(args.data_source, args.num_shards, args.data_dir)
    step, states = 0, [None] * accum
    loop = {"smooth_loss": 0.0, "train_seconds": 0.0, "min_val_bpb": None}
    if resume_from is not None:
        for path, missing in skipped:
            say(ctx, f"--resume: skipping {path.name}, which lacks {', '.join(missing)} (a save or cleanup was killed)")
        meta, saved_loaders = checkpoint.load(resume_from, model, optimizer, ctx, device=ctx.device)
        if meta["model_config"] != config.to_dict():
            raise RuntimeError(f"--resume: the checkpoint's model {meta['model_config']} differs from the flags' {config.to_dict()}")
        step = meta["step"]
        loop.update(meta.get("loop", {}))
        checkpoint.set_rng_state(meta.get("rng"))
        states = resumed_streams(saved_loaders, ctx.rank, accum)
        saved_world = meta.get("world_size", 1)
        saved_accum = data_streams(meta["args"]) // saved_world
        message = (f"resumed at step {step} on {ctx.world_size} ranks (was {saved_world}), "
                   f"accumulation {saved_accum} → {accum}")
        say(ctx, message)
        events.emit("resume", step=step, checkpoint=str(resume_from), world_size=ctx.world_size, saved_world_size=saved_world,
                    grad_accum=accum, saved_grad_accum=saved_accum, message=message,
                    skipped=[{"checkpoint": str(p), "missing": m} for p, m in skipped])

    events.emit("setup", model_config=config.to_dict(), params=model.num_params(), scaling_params=model.num_scaling_params(),
                flops_per_token=flops_per_token, num_iterations=num_iterations, horizon_from=horizon_from,
                grad_accum=accum, world_size=ctx.world_size, device=ctx.device_name, dtype=str(ctx.dtype).replace("torch.", ""),
                total_tokens=num_iterations * args.total_batch_size,
                total_flops=flops_per_token * num_iterations * args.total_batch_size,
                data_origin=shards.origin, data_note=shards.note, peak_flops=peak)

    # On CPU, compiled bf16 was ~1.6x eager on our AMX machines (BENCHMARKS.md) but needs a C++ compiler for inductor.
    use_compile = args.compile == "yes" or (
        args.compile == "auto" and (ctx.device_type == "cuda" or (ctx.device_type == "cpu" and shutil.which("g++") is not None)))
    fwd = torch.compile(model, dynamic=False) if use_compile else model
    # The data is striped over world_size x accum "micro-batch streams", and
    # rank r feeds its k-th micro-step from stream r*accum + k. So 1 GPU with 8
    # accumulation steps sees exactly the batches 8 GPUs would: the runs agree
    # up to floating-point summation order.
    streams = ctx.world_size * accum
    loaders = [PretrainLoader(shards.train, tok, args.device_batch_size, args.max_seq_len, rank=ctx.rank * accum + k,
                              world_size=streams, device=ctx.device, state=states[k],
                              threads=max(1, args.loader_threads // accum)) for k in range(accum)]
    batches = [iter(ld) for ld in loaders]
    token_bytes = torch.tensor(tok.token_bytes, dtype=torch.int64, device=ctx.device)

    def due(every: int, s: int) -> bool:
        return s == num_iterations or (every > 0 and s % every == 0)

    def save(s: int):
        meta = {"model_config": config.to_dict(), "args": vars(args), "loop": loop, "num_iterations": num_iterations,
                "rng": checkpoint.rng_state()}
        loader_state = {"streams": [ld.state_dict() for ld in loaders]}
        path = checkpoint.save(ckpt_root, s, model, optimizer, loader_state, meta, ctx, keep_last=args.keep_last)
        events.emit("checkpoint", step=s, path=str(path))

    last_saved = step
    try:
        while True:
            if due(args.eval_every, step) and (step > 0 or args.eval_every > 0):
                model.eval()
                t0 = time.time()
                bpb = evaluate_bpb(fwd, val_batches([shards.val], tok, args.device_batch_size, args.max_seq_len, args.eval_tokens,
                                                    rank=ctx.rank, world_size=ctx.world_size, device=ctx.device), token_bytes, ctx)
                model.train()
                if loop["min_val_bpb"] is None or bpb < loop["min_val_bpb"]:
                    loop["min_val_bpb"] = bpb
                events.emit("eval", name="val_bpb", step=step, val_bpb=bpb, seconds=round(time.time() - t0, 3))
            if due(args.sample_every, step) and step > 0 and ctx.master:
                model.eval()
                samples = sample_completions(model, tok, ctx)
                model.train()
                events.emit("sample", step=step, samples=samples)
            if step > last_saved and (due(args.save_every, step) or stage.stop_requested):
                save(step)
                last_saved = step
            if step >= num_iterations or stage.stop_requested:
                break

            # One optimizer step: `accum` micro-batches of gradients, averaged.
            t0 = time.time()
            loss_sum = torch.zeros((), device=ctx.device)
            for k in range(accum):
                x, y, _ = next(batches[k])
                with ctx.autocast():
                    loss = fwd(x, y)
                (loss / accum).backward()
                loss_sum += loss.detach().float()
            lrm = lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group.get("kind") == "muon":
                    group["momentum"] = muon_momentum(step)
                    group["weight_decay"] = weight_decay_at(step, num_iterations, args.weight_decay)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            train_loss = (loss_sum / accum).item()  # mean over micro-batches (and, below, ranks); syncs the device
            ctx.synchronize()
            dt = time.time() - t0
            step += 1

            if step == args.stop_after_step:
                stage.stop_requested = True
            # One collective per step carries both the mean loss and any stop request
            # (SIGTERM/SIGINT), which every rank must act on at the same step.
            if ctx.distributed:
                shared = torch.tensor([train_loss, 1.0 if stage.stop_requested else 0.0], dtype=torch.float64, device=ctx.device)
                dist.all_reduce(shared)
                train_loss, stage.stop_requested = shared[0].item() / ctx.world_size, shared[1].item() > 0
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"loss became {train_loss} at step {step}; lower the learning rates or check the data")
            beta = 0.9
            loop["smooth_loss"] = beta * loop["smooth_loss"] + (1 - beta) * train_loss
            smooth = loop["smooth_loss"] / (1 - beta ** step)
            if step > 10 or num_iterations <= 10:
                loop["train_seconds"] += dt  # like the reference, the first steps (compilation) are not counted
            tok_per_sec = args.total_batch_size / dt
            mfu = 100 * flops_per_token * tok_per_sec / (peak * ctx.world_size) if peak else None
            if step % args.log_every == 0 or step == num_iterations:
                events.metric(step=step, loss=round(train_loss, 6), smooth_loss=round(smooth, 6), lrm=round(lrm, 6),
                              dt=round(dt, 4), tok_per_sec=round(tok_per_sec, 1), mfu=None if mfu is None else round(mfu, 2),
                              peak_mem_mb=round(ctx.max_memory_mb(), 1), epoch=loaders[0].state_dict().get("epoch", 0),
                              fraction=round(step / num_iterations, 5), train_seconds=round(loop["train_seconds"], 3))
            if ctx.master and (step % 10 == 0 or step == num_iterations):
                print(f"step {step:6d}/{num_iterations} | loss {train_loss:.4f} (smooth {smooth:.4f}) | lrm {lrm:.3f} | "
                      f"{dt * 1000:.0f} ms | {tok_per_sec:,.0f} tok/s" + (f" | mfu {mfu:.1f}%" if mfu else ""), flush=True)

        events.emit("result", step=step, num_iterations=num_iterations, min_val_bpb=loop["min_val_bpb"],
                    train_seconds=round(loop["train_seconds"], 3), params=model.num_params())
        return "interrupted" if stage.stop_requested and step < num_iterations else "done"
    finally:
        for b in batches:
            b.close()  # stop each loader's background threads before the interpreter exits


def say(ctx, message: str):
    if ctx.master:
        print(message, flush=True)


def main(argv=None):
    args = parse_args(argv)
    # STOP: the first SIGTERM/SIGINT finishes the step, saves a checkpoint and exits 75; a second kills.
    with Stage(STAGE, signals=STOP) as stage:
        ctx = common.setup(args.device, args.dtype, args.seed)
        stage.start(EventWriter(args.run_dir, STAGE, enabled=ctx.master), args=vars(args), world_size=ctx.world_size)
        if not (Path(args.run_dir) / "tokenizer" / "tokenizer.json").exists():
            raise FileNotFoundError(f"{args.run_dir}/tokenizer/tokenizer.json not found; run the tok_train stage first")
        stage.status = train(args, ctx, stage)
    return stage.exit_code


if __name__ == "__main__":
    sys.exit(main())
