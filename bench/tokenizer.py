"""Benchmark the bpe_rust tokenizer trainer against HF ``tokenizers`` (and tiktoken for encoding).

Usage:
    python bench/tokenizer.py [--mirror DIR] [--mb 60] [--vocab-sizes 32768,65536]
                              [--threads N] [--encode-mb 10] [--repeats 3] [--out results.json]

What it measures, on one machine, in one run, on one corpus, with one split regex
(``bpe_rust.DEFAULT_PATTERN``) and the same special tokens:

* training wall time and peak memory (RSS high-water mark) of ``bpe_rust.Tokenizer.train``
  vs HF ``tokenizers`` ``BpeTrainer`` (BPE model, pre-tokenizer
  Sequence[Split(Regex(DEFAULT_PATTERN), "isolated"), ByteLevel(use_regex=False)],
  ``initial_alphabet=ByteLevel.alphabet()``), for each vocab size. Each trainer runs in its
  own subprocess so their memory does not mix; the corpus (``--mb`` MB of real text:
  the pretraining parquet shards ``pretrain/sample-shards/shard_0000[0-4].parquet``, then
  gutenberg ``.txt.gz`` books if more is needed) is loaded into a list first, so the
  "train" time covers training only. "base" is the RSS before training started.
* compression: UTF-8 bytes per token of both trained tokenizers on the held-out shard
  ``shard_00005.parquet`` (relative difference ours vs HF);
* encoding throughput (MB/s), one thread and ``--threads`` threads, of our runtime path (HF
  ``tokenizers`` loading OUR exported tokenizer.json, ``encode_batch``), of tiktoken loaded
  with the same vocabulary (``encode_ordinary`` / ``encode_ordinary_batch``) and of
  ``bpe_rust``'s own ``encode_batch``. Each mode runs in a subprocess with
  ``RAYON_NUM_THREADS`` / ``TOKENIZERS_PARALLELISM`` set for it; best of ``--repeats``.

Prints a table with ratios (ours / peer) and writes everything as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- corpus


def load_corpus(mirror: Path, mb: float) -> list[str]:
    """At least ``mb`` MB (UTF-8) of documents: parquet shards 0-4, then gutenberg books."""
    import pyarrow.parquet as pq

    limit = mb * 1e6
    docs, size = [], 0
    shards = sorted(glob.glob(str(mirror / "pretrain/sample-shards/shard_0000[0-4].parquet")))
    books = sorted(glob.glob(str(mirror / "pretrain/gutenberg/*.txt.gz")))
    if not shards:
        sys.exit(f"no parquet shards under {mirror}/pretrain/sample-shards (use --mirror)")
    for f in shards:
        for batch in pq.ParquetFile(f).iter_batches(columns=["text"], batch_size=1024):
            for t in batch.column(0).to_pylist():
                if size >= limit:
                    return docs
                docs.append(t)
                size += len(t.encode("utf-8"))
    for f in books:
        if size >= limit:
            return docs
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        docs.append(t)
        size += len(t.encode("utf-8"))
    if size < limit:
        print(f"warning: the mirror only holds {size / 1e6:.1f} MB of text", file=sys.stderr)
    return docs


def load_heldout(mirror: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(mirror / "pretrain/sample-shards/shard_00005.parquet", columns=["text"]).column(0).to_pylist()


def encode_texts(mirror: Path, mb: float) -> list[str]:
    """Held-out shard, topped up with the first documents of the corpus to ``mb`` MB."""
    docs = load_heldout(mirror)
    size = sum(len(d.encode()) for d in docs)
    for d in load_corpus(mirror, max(mb - size / 1e6, 0.1)):
        if size >= mb * 1e6:
            break
        docs.append(d)
        size += len(d.encode())
    return docs


def nbytes(docs) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- workers (subprocesses)


def hf_trainer_setup(vocab_size: int):
    import bpe_rust

    from trainer.tok_eval import hf_bpe_trainer

    return hf_bpe_trainer(bpe_rust.DEFAULT_PATTERN, vocab_size)


def worker_train(spec: dict) -> dict:
    mirror, which, vocab, out = Path(spec["mirror"]), spec["which"], spec["vocab"], spec["out"]
    docs = load_corpus(mirror, spec["mb"])
    corpus_bytes = nbytes(docs)
    if which == "ours":
        import bpe_rust

        base = rss_mb()
        t0 = time.perf_counter()
        tok = bpe_rust.Tokenizer.train(docs, vocab)
        dt = time.perf_counter() - t0
        peak = peak_rss_mb()
        tok.save_hf(out)
        info = {"vocab_size": tok.vocab_size, "merges": len(tok.merges)}
    else:
        tok, trainer = hf_trainer_setup(vocab)
        base = rss_mb()
        t0 = time.perf_counter()
        tok.train_from_iterator(docs, trainer, length=len(docs))
        dt = time.perf_counter() - t0
        peak = peak_rss_mb()
        tok.save(out)
        info = {"vocab_size": tok.get_vocab_size()}
    return {"train_s": dt, "peak_rss_mb": peak, "base_rss_mb": base, "corpus_bytes": corpus_bytes,
            "n_docs": len(docs), **info}


def load_hf(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True
    return tok


def worker_compress(spec: dict) -> dict:
    import bpe_rust

    held = load_heldout(Path(spec["mirror"]))
    b = nbytes(held)
    res = {"heldout_bytes": b}
    for name in ("ours", "hf"):
        tok = load_hf(spec[name])
        n = sum(len(e.ids) for e in tok.encode_batch(held))
        res[f"{name}_tokens"] = n
        res[f"{name}_bytes_per_token"] = b / n
    ours = bpe_rust.Tokenizer.load(spec["ours"])
    hf_ours = load_hf(spec["ours"])
    res["ours_runtime_matches_hf"] = ours.encode_batch(held) == [e.ids for e in hf_ours.encode_batch(held)]
    return res


def worker_encode(spec: dict) -> dict:
    """One engine, one thread setting (the env vars were set by the parent)."""
    engine, threads, repeats = spec["engine"], spec["threads"], spec["repeats"]
    docs = encode_texts(Path(spec["mirror"]), spec["encode_mb"])
    b = nbytes(docs)
    if engine == "hf_ours":
        tok = load_hf(spec["ours"])

        def run():  # serial when TOKENIZERS_PARALLELISM=false (the 1-thread mode)
            return sum(len(e.ids) for e in tok.encode_batch(docs))
    elif engine == "tiktoken":
        import tiktoken

        import bpe_rust

        src = bpe_rust.Tokenizer.load(spec["ours"])
        enc = tiktoken.Encoding(
            "bench", pat_str=src.pattern, mergeable_ranks=dict(src.mergeable_ranks()),
            special_tokens=src.special_tokens,
        )
        del src

        def run():
            if threads == 1:
                return sum(len(enc.encode_ordinary(d)) for d in docs)
            return sum(len(x) for x in enc.encode_ordinary_batch(docs, num_threads=threads))
    else:
        import bpe_rust

        tok = bpe_rust.Tokenizer.load(spec["ours"])

        def run():
            return sum(len(x) for x in tok.encode_batch(docs))

    times, ntok = [], None
    run()  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        ntok = run()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"mb_per_s": b / 1e6 / best, "seconds": best, "bytes": b, "tokens": ntok}


WORKERS = {"train": worker_train, "compress": worker_compress, "encode": worker_encode}


def spawn(spec: dict, env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    r = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        env=env, capture_output=True, text=True,
    )
    if r.returncode != 0:
        sys.exit(f"worker {spec} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def machine_info() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import tiktoken
    import tokenizers

    import bpe_rust

    return {
        "nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
        "bpe_rust": bpe_rust.__version__, "tokenizers": tokenizers.__version__,
        "tiktoken": tiktoken.__version__, "loadavg_at_start": os.getloadavg(),
    }


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_mirror = os.environ.get("NANOSTUDIO_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
    ap.add_argument("--mirror", default=default_mirror, help="data mirror folder (default: %(default)s)")
    ap.add_argument("--mb", type=float, default=60, help="training corpus size in MB (default 60)")
    ap.add_argument("--vocab-sizes", default="32768,65536")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for the parallel modes")
    ap.add_argument("--encode-mb", type=float, default=10, help="text size for encode throughput")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return

    mirror = Path(args.mirror)
    vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    info = machine_info()
    print(f"machine: nproc={info['nproc']}, CPU: {info['cpu']}, Python {info['python']}, "
          f"tokenizers {info['tokenizers']}, tiktoken {info['tiktoken']}, threads={args.threads}")
    train_env = {"RAYON_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "true"}
    results = {"machine": info, "args": vars(args), "vocab": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    for vocab in vocab_sizes:
        r = {}
        for which in ("ours", "hf"):
            out = str(tmp / f"{which}_{vocab}.json")
            spec = {"kind": "train", "which": which, "vocab": vocab, "mirror": str(mirror), "mb": args.mb, "out": out}
            r[f"train_{which}"] = spawn(spec, train_env)
            r[f"json_{which}"] = out
            t = r[f"train_{which}"]
            print(f"  trained {which:4s} vocab {vocab}: {t['train_s']:.1f} s, peak {t['peak_rss_mb']:.0f} MB "
                  f"(corpus {t['corpus_bytes'] / 1e6:.1f} MB, {t['n_docs']} docs)", flush=True)
        r["compress"] = spawn({"kind": "compress", "mirror": str(mirror), "ours": r["json_ours"], "hf": r["json_hf"]})
        enc = {}
        for threads in sorted({1, args.threads}):
            env = {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false"}
            for engine in ("hf_ours", "tiktoken", "bpe_rust"):
                spec = {"kind": "encode", "engine": engine, "threads": threads, "repeats": args.repeats,
                        "mirror": str(mirror), "encode_mb": args.encode_mb, "ours": r["json_ours"]}
                enc[f"{engine}@{threads}"] = spawn(spec, env)
        r["encode"] = enc
        results["vocab"][str(vocab)] = r

    # ---- table
    lines = []
    for vocab in vocab_sizes:
        r = results["vocab"][str(vocab)]
        o, h, c = r["train_ours"], r["train_hf"], r["compress"]
        lines.append(f"\n== vocab {vocab}  (corpus {o['corpus_bytes'] / 1e6:.1f} MB, {o['n_docs']} docs; "
                     f"held-out {c['heldout_bytes'] / 1e6:.2f} MB)")
        lines.append(f"{'':34s}{'bpe_rust':>12s}{'HF tokenizers':>15s}{'ours/peer':>11s}")
        lines.append(f"{'train wall time [s]':34s}{o['train_s']:12.2f}{h['train_s']:15.2f}"
                     f"{o['train_s'] / h['train_s']:10.3f}   ({h['train_s'] / o['train_s']:.1f}x faster)")
        lines.append(f"{'peak RSS [MB]':34s}{o['peak_rss_mb']:12.0f}{h['peak_rss_mb']:15.0f}"
                     f"{o['peak_rss_mb'] / h['peak_rss_mb']:10.3f}")
        lines.append(f"{'  of which before training [MB]':34s}{o['base_rss_mb']:12.0f}{h['base_rss_mb']:15.0f}")
        dbt = (c["ours_bytes_per_token"] / c["hf_bytes_per_token"] - 1) * 100
        lines.append(f"{'held-out bytes/token':34s}{c['ours_bytes_per_token']:12.4f}{c['hf_bytes_per_token']:15.4f}"
                     f"{c['ours_bytes_per_token'] / c['hf_bytes_per_token']:10.4f}   ({dbt:+.3f}%)")
        lines.append(f"{'bpe_rust.encode == HF(our json)':34s}{str(c['ours_runtime_matches_hf']):>12s}")
        e = r["encode"]
        lines.append(f"encode throughput [MB/s] ({e['hf_ours@1']['bytes'] / 1e6:.1f} MB of text)")
        lines.append(f"{'':34s}{'HF(our json)':>12s}{'tiktoken':>15s}{'ours/peer':>11s}{'bpe_rust':>10s}")
        for threads in sorted({1, args.threads}):
            hf, tt, br = (e[f"{k}@{threads}"]["mb_per_s"] for k in ("hf_ours", "tiktoken", "bpe_rust"))
            lines.append(f"{f'  {threads} thread(s)':34s}{hf:12.2f}{tt:15.2f}{hf / tt:10.3f}{br:10.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_at_end"] = os.getloadavg()
    lines.append(f"\nload average at start {info['loadavg_at_start'][0]:.2f}, at end {results['loadavg_at_end'][0]:.2f}")
    table = "\n".join(lines)
    print(table)
    results["table"] = table
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
