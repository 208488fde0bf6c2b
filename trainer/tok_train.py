"""Stage 1: train the byte-level BPE tokenizer (Rust, bpe_rust) on pretraining text.

    python -m trainer.tok_train --run-dir runs/demo --vocab-size 65536 --max-chars 2000000000

Reads training shards (from --data-dir, the offline mirror, or upstream),
crops each document to --doc-cap characters, stops after --max-chars, and
writes into <run-dir>/tokenizer/:
    tokenizer.json       HuggingFace `tokenizers` file: the run-time encoder
    tokenizer.tiktoken   the same vocabulary as tiktoken mergeable ranks (for comparisons)
    meta.json            pattern, special tokens, training statistics
Events (stage "tok_train") go to <run-dir>/events.jsonl.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from pipeline import dataset
from pipeline.events import EventWriter, write_json_atomic
from pipeline.harness import Stage
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

STAGE = "tok_train"
# A fixed multilingual, emoji and code string that must survive encode/decode.
ROUNDTRIP_PROBE = "Hello world! Ünïcödé, 日本語のテキスト, 한국어, emoji 🎉👩‍💻, code: `x += 1;\n\tprint(x)` and 3.14159 <|bos|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the BPE tokenizer of a run (Rust trainer, HF tokenizers export).")
    p.add_argument("--run-dir", required=True, help="run directory; the tokenizer goes to <run-dir>/tokenizer/")
    p.add_argument("--vocab-size", type=int, default=65536, help="total vocabulary incl. 256 bytes and 9 special tokens")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters of text to train on")
    p.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    p.add_argument("--data-source", default="fineweb-edu", choices=sorted(dataset.SOURCES), help="upstream corpus")
    p.add_argument("--data-dir", default=None, help="your own prepared shards instead of the upstream corpus")
    p.add_argument("--num-shards", type=int, default=None,
                   help="training shards to read (default: enough for --max-chars at ~250M chars per shard)")
    p.add_argument("--pattern", default=None, help="split regex (default: GPT-4 style with 1-2 digit numbers)")
    args = p.parse_args(argv)
    if args.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        p.error(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)")
    if args.max_chars < 1:
        p.error("--max-chars must be positive")
    if args.doc_cap < 1:
        p.error("--doc-cap must be positive")
    return args


def train(args, events: EventWriter) -> dict:
    import bpe_rust

    shards = dataset.text_shards(args.data_source, args.max_chars, args.data_dir, args.num_shards)
    events.emit("data", origin=shards.origin, note=shards.note, train_shards=[str(p) for p in shards.train], val_shard=str(shards.val))
    seen = {"chars": 0, "docs": 0}

    def progress(chars, docs):
        seen.update(chars=chars, docs=docs)
        events.metric(chars=chars, docs=docs, fraction=round(chars / args.max_chars, 4))

    texts = dataset.iter_training_text(shards.train, args.max_chars, args.doc_cap, on_progress=progress,
                                       every=max(1, min(args.max_chars // 20, 1 << 26)))
    t0 = time.time()
    tok = bpe_rust.Tokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=SPECIAL_TOKENS)
    train_seconds = time.time() - t0
    if seen["chars"] < args.max_chars:
        events.emit("warning", message=f"the training text ran out after {seen['chars']:,} of the {args.max_chars:,} characters asked for")

    out = Path(args.run_dir) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, so a kill never leaves half a tokenizer.
    tmp_json, tmp_tt = out / ".tokenizer.json.tmp", out / ".tokenizer.tiktoken.tmp"
    tok.save_hf(str(tmp_json))
    tok.save_tiktoken(str(tmp_tt))
    tmp_tt.replace(out / "tokenizer.tiktoken")
    tmp_json.replace(out / "tokenizer.json")

    runtime = Tokenizer.from_dir(out)
    ids = runtime.encode(ROUNDTRIP_PROBE)
    if runtime.decode(ids) != ROUNDTRIP_PROBE:
        raise RuntimeError("round-trip check failed: decode(encode(probe)) differs from the probe")
    if ids != tok.encode(ROUNDTRIP_PROBE):
        raise RuntimeError("the exported tokenizer.json encodes differently from the trainer; please report this bug")
    token_bytes = [b for b in runtime.token_bytes if b > 0]
    stats = {
        "vocab_size": runtime.vocab_size,
        "requested_vocab_size": args.vocab_size,
        "merges": len(tok.merges),
        "pattern": tok.pattern,
        "special_tokens": tok.special_tokens,
        "train_seconds": round(train_seconds, 3),
        "max_chars": args.max_chars,
        "chars_seen": seen["chars"],
        "docs_seen": seen["docs"],
        "doc_cap": args.doc_cap,
        "data_origin": shards.origin,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "token_bytes_min": min(token_bytes),
        "token_bytes_max": max(token_bytes),
        "token_bytes_mean": round(sum(token_bytes) / len(token_bytes), 3),
    }
    write_json_atomic(out / "meta.json", stats)
    return stats


def main(argv=None):
    args = parse_args(argv)
    with Stage(STAGE) as stage:
        stage.start(EventWriter(args.run_dir, STAGE), args=vars(args))
        stats = train(args, stage.events)
        stage.events.emit("result", **{k: v for k, v in stats.items() if k != "special_tokens"})
        print(f"tokenizer: vocab {stats['vocab_size']}, {stats['merges']} merges, trained in {stats['train_seconds']:.1f}s "
              f"-> {Path(args.run_dir) / 'tokenizer' / 'tokenizer.json'}")
    return stage.exit_code


if __name__ == "__main__":
    sys.exit(main())
