"""Benchmark pretraining: throughput, MFU, loader headroom, and quality per minute.

Usage:
    python bench/train.py                       # CPU: the tiny preset, <= 10 minutes of training
    python bench/train.py --minutes 3 --out bench/results/train.json
    python bench/train.py --gpu-depths 12,20    # on a CUDA machine: tok/s and MFU per depth at seq 2048

What it compares, all measured in this run:
  * training tokens/s of the `tiny` preset through the real stage command
    (python -m trainer.base_train), and its MFU against the measured peak of
    this machine's dense matmul in the same dtype (the physical limit here);
  * validation bits-per-byte reached within the time budget vs the unigram
    baseline (a model that knows only token frequencies, fitted on the same
    training tokens): the model must be clearly below it;
  * data loader tokens/s (the real PretrainLoader on the same shards) vs the
    tokens/s training consumes: the loader must have >= 3x headroom;
  * on CUDA: tokens/s per GPU and MFU for each depth in --gpu-depths at
    seq 2048, bf16, torch.compile, against the datasheet peak.
Results print as tables and go to --out as JSON. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def default_mirror() -> str:
    return os.environ.get("NANOSTUDIO_DATA_MIRROR") or str(REPO.parent / "shared" / "data")


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in this dtype on this CPU (the practical ceiling)."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def unigram_bpb(run_dir: Path, train_tokens: int) -> float:
    """Bits per byte of the best token-frequency model (add-one smoothed) on the validation shard."""
    from pipeline import dataset
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(run_dir)
    shards = dataset.pretrain_shards("fineweb-edu", 5)
    counts: Counter = Counter()
    seen = 0
    for text in dataset.iter_parquet_texts(shards.train):
        ids = tok.encode(text, prepend=tok.bos_id)
        counts.update(ids[1:])  # BOS is never a target in the bpb sums
        seen += len(ids)
        if seen >= train_tokens:
            break
    total = sum(counts.values()) + tok.vocab_size
    token_bytes = tok.token_bytes
    bits = nbytes = 0.0
    for text in dataset.iter_parquet_texts([shards.val]):
        for i in tok.encode(text):
            if token_bytes[i] == 0:
                continue
            bits -= math.log2((counts[i] + 1) / total)
            nbytes += token_bytes[i]
    return bits / nbytes


def loader_tokens_per_sec(run_dir: Path, batch: int, seq: int, threads: int, seconds: float = 15.0) -> float:
    from pipeline import dataset
    from gpt.data import PretrainLoader
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(run_dir)
    shards = dataset.pretrain_shards("fineweb-edu", 5)
    it = iter(PretrainLoader(shards.train, tok, batch, seq, threads=threads))
    next(it)  # start-up (first row groups) is not what we measure
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _, _ = next(it)
        n += x.numel()
    return n / (time.perf_counter() - t0)


def prepare_run(run_dir: Path, preset: dict) -> None:
    if (run_dir / "tokenizer" / "tokenizer.json").exists():
        return
    subprocess.run([sys.executable, "-m", "trainer.tok_train", "--run-dir", str(run_dir),
                    f"--vocab-size={preset['vocab_size']}", f"--max-chars={preset['tok_max_chars']}"],
                   cwd=REPO, check=True)


def cpu_bench(args) -> dict:
    from pipeline import config
    from pipeline.events import read_events

    cfg = config.resolve("tiny")
    run = Path(args.run_dir or REPO / "bench" / "results" / "train_run")
    for stale in (run / "events.jsonl",):
        stale.unlink(missing_ok=True)
    import shutil

    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    prepare_run(run, cfg)
    cmd = [sys.executable, "-m", "trainer.base_train", "--run-dir", str(run),
           f"--depth={cfg['depth']}", f"--max-seq-len={cfg['max_seq_len']}",
           f"--device-batch-size={cfg['device_batch_size']}", f"--total-batch-size={cfg['total_batch_size']}",
           f"--target-param-data-ratio={cfg['target_param_data_ratio']}", f"--num-iterations={cfg['num_iterations']}",
           f"--eval-every={cfg['eval_every']}", f"--eval-tokens={cfg['eval_tokens']}", "--sample-every=0", "--save-every=0",
           f"--compile={args.compile}", f"--dtype={args.dtype}"]
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # base_train saves and exits 75 on SIGTERM
        proc.wait()
    wall = time.time() - t0
    events, _ = read_events(run)
    setup = next(e for e in events if e["kind"] == "setup")
    metrics = [e for e in events if e["kind"] == "metric" and e["stage"] == "base_train"]
    evals = [e for e in events if e["kind"] == "eval" and e["stage"] == "base_train"]
    steady = metrics[len(metrics) // 5:] or metrics  # skip warm-up and compilation
    tok_s = sorted(e["tok_per_sec"] for e in steady)[len(steady) // 2]
    step_ms = sorted(e["dt"] for e in steady)[len(steady) // 2] * 1000
    dtype = setup["dtype"]
    peak = matmul_peak(dtype)
    mfu = 100 * setup["flops_per_token"] * tok_s / peak
    uni = unigram_bpb(run, train_tokens=2_000_000)
    loader = {t: loader_tokens_per_sec(run, cfg["device_batch_size"], cfg["max_seq_len"], t) for t in (1, 2)}
    result = {
        "preset": "tiny", "wall_seconds": round(wall, 1), "steps": metrics[-1]["step"] if metrics else 0,
        "num_iterations": setup["num_iterations"], "params": setup["params"], "dtype": dtype,
        "tok_per_sec": tok_s, "step_ms": step_ms, "matmul_peak_flops": peak, "mfu_vs_matmul_peak": mfu,
        "val_bpb": [(e["step"], round(e["val_bpb"], 4)) for e in evals], "unigram_bpb": round(uni, 4),
        "loader_tok_per_sec": loader, "loader_headroom": {t: v / tok_s for t, v in loader.items()},
    }
    print(f"\n== tiny preset on CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), {dtype}, compile={args.compile}")
    print(f"model: depth {cfg['depth']}, {setup['params']:,} params, seq {cfg['max_seq_len']}, batch {cfg['total_batch_size']} tokens")
    print(f"steps run: {result['steps']}/{setup['num_iterations']} in {wall:.0f} s wall")
    print(f"{'training tokens/s (median)':40s} {tok_s:12,.0f}")
    print(f"{'step time (median)':40s} {step_ms:10.1f} ms")
    print(f"{'matmul peak, same dtype (this CPU)':40s} {peak / 1e9:10.1f} GFLOP/s")
    print(f"{'MFU vs that peak':40s} {mfu:10.1f} %")
    last_bpb = evals[-1]["val_bpb"] if evals else float('nan')
    print(f"{'validation bpb (last eval)':40s} {last_bpb:10.4f}")
    print(f"{'unigram baseline bpb':40s} {uni:10.4f}   ratio {last_bpb / uni:.3f}")
    for t, v in loader.items():
        print(f"{f'loader tokens/s, {t} thread(s)':40s} {v:12,.0f}   headroom {v / tok_s:.1f}x")
    print("bpb over steps:", ", ".join(f"{s}: {b}" for s, b in result["val_bpb"]))
    return result


def gpu_bench(args) -> list[dict]:
    import torch

    from gpt import common
    from gpt.model import GPTConfig, build_model
    from gpt.optim import build_optimizer

    ctx = common.setup("cuda", "bfloat16")
    peak = common.peak_flops(ctx.device_name)
    rows = []
    for depth in [int(d) for d in args.gpu_depths.split(",") if d]:
        cfg = GPTConfig.from_depth(depth, 65536, sequence_len=2048)
        model = build_model(cfg, ctx.device)
        opt = build_optimizer(model)
        fwd = torch.compile(model, dynamic=False)
        B = args.gpu_batch
        x = torch.randint(0, 65536, (B, 2048), device=ctx.device)
        times = []
        for i in range(args.gpu_steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with ctx.autocast():
                loss = fwd(x, x)
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = sorted(times[3:])[len(times[3:]) // 2]
        tok_s = B * 2048 / dt
        mfu = 100 * model.flops_per_token() * tok_s / peak if peak else None
        rows.append({"depth": depth, "params": model.num_params(), "batch": B, "tok_per_sec": tok_s, "step_ms": dt * 1000,
                     "mfu": mfu, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "device": ctx.device_name})
        print(f"depth {depth}: {tok_s:,.0f} tok/s, {dt * 1000:.0f} ms/step, MFU {mfu:.1f}%, "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del model, opt, fwd
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rows


def main():
    p = argparse.ArgumentParser(description="Pretraining benchmark (see module docstring).")
    p.add_argument("--minutes", type=float, default=10, help="training time budget for the tiny preset on CPU")
    p.add_argument("--run-dir", default=None, help="run directory to use (default bench/results/train_run)")
    p.add_argument("--compile", default="yes", choices=["yes", "no"], help="torch.compile on CPU")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="autocast dtype")
    p.add_argument("--gpu-depths", default="", help="comma-separated depths to measure on CUDA (e.g. 12,20)")
    p.add_argument("--gpu-batch", type=int, default=16, help="sequences per GPU step for --gpu-depths")
    p.add_argument("--gpu-steps", type=int, default=15, help="steps per depth (the first 3 are warm-up)")
    p.add_argument("--out", default=None, help="write results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("NANOSTUDIO_DATA_MIRROR", default_mirror())
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    if args.gpu_depths:
        result["gpu"] = gpu_bench(args)
    else:
        result["cpu"] = cpu_bench(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
