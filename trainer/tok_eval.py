"""Stage 2: how well does the tokenizer compress text? (bytes per token, by domain)

    python -m trainer.tok_eval --run-dir runs/demo

Compares the run's tokenizer with
  * an HF `tokenizers` BpeTrainer tokenizer trained here on the same text,
    same vocabulary size, split pattern and special tokens (always), and
  * the GPT-2 and GPT-4 vocabularies when their tiktoken files are on this
    machine (--ref-vocab-dir, default $NANOSTUDIO_CACHE/tiktoken, or
    tiktoken's own cache); nothing is downloaded for them.
Domains: English web-style prose, source code, LaTeX math, non-English text
(German, Korean, Chinese, Russian), and the first row group of the first
training shard and of the validation shard.

Writes <run-dir>/tokenizer/eval.json and an "eval" event with the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline import dataset
from pipeline.events import EventWriter, write_json_atomic
from pipeline.harness import Stage
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

STAGE = "tok_eval"

# Sample texts written for this project (short, but each clearly one domain).
SAMPLES = {
    "web": (
        "City officials announced on Tuesday that the riverside park will reopen next spring after an "
        "eighteen-month restoration. The project replaced the crumbling sea wall, planted more than 2,000 "
        "native trees and added a protected cycling path that links the old harbour to the university "
        "district. \"People kept asking when they could come back,\" said the parks director, who added "
        "that the final cost came in about 4% under the original budget of $38 million. Local businesses "
        "along the waterfront welcomed the news, although some residents worry about parking during the "
        "summer festival season. A public meeting to discuss traffic plans is scheduled for March 14 at "
        "the community centre on Elm Street."
    ),
    "code": (
        "import heapq\nfrom collections import defaultdict\n\n\n"
        "def shortest_paths(graph: dict[str, list[tuple[str, float]]], source: str) -> dict[str, float]:\n"
        "    \"\"\"Dijkstra's algorithm over an adjacency list with non-negative weights.\"\"\"\n"
        "    dist = defaultdict(lambda: float(\"inf\"))\n"
        "    dist[source] = 0.0\n"
        "    queue = [(0.0, source)]\n"
        "    while queue:\n"
        "        d, node = heapq.heappop(queue)\n"
        "        if d > dist[node]:\n"
        "            continue  # stale entry\n"
        "        for neighbour, weight in graph.get(node, []):\n"
        "            candidate = d + weight\n"
        "            if candidate < dist[neighbour]:\n"
        "                dist[neighbour] = candidate\n"
        "                heapq.heappush(queue, (candidate, neighbour))\n"
        "    return dict(dist)\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    g = {\"a\": [(\"b\", 1.5), (\"c\", 4)], \"b\": [(\"c\", 2)], \"c\": []}\n"
        "    print(shortest_paths(g, \"a\"))  # {'a': 0.0, 'b': 1.5, 'c': 3.5}\n"
    ),
    "math": (
        "\\begin{theorem}Let $f:[a,b]\\to\\mathbb{R}$ be continuous on $[a,b]$ and differentiable on $(a,b)$. "
        "Then there exists $c\\in(a,b)$ such that\n\\[ f'(c) = \\frac{f(b)-f(a)}{b-a}. \\]\\end{theorem}\n"
        "\\begin{proof}Define $g(x) = f(x) - \\frac{f(b)-f(a)}{b-a}(x-a)$. Then $g(a) = g(b) = f(a)$, so by "
        "Rolle's theorem some $c$ satisfies $g'(c)=0$, i.e. $f'(c) = \\frac{f(b)-f(a)}{b-a}$.\\end{proof}\n"
        "For example, $\\int_0^1 x^2\\,dx = \\left[\\tfrac{x^3}{3}\\right]_0^1 = \\tfrac13$ and "
        "$\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$, while $e^{i\\pi} + 1 = 0$ and "
        "$\\lim_{n\\to\\infty}\\left(1+\\frac{1}{n}\\right)^n = e \\approx 2.71828$."
    ),
    "non-english": (
        "Die Bibliothek bleibt wegen Renovierungsarbeiten bis Ende Oktober geschlossen; ausgeliehene Bücher "
        "können am Automaten im Foyer zurückgegeben werden.\n"
        "오늘 아침에는 비가 많이 왔지만 오후에는 날씨가 맑아져서 공원에 산책하러 가는 사람들이 많았습니다.\n"
        "我们明天早上八点在火车站见面，然后一起去山上看日出。如果下雨的话，我们就改到下个周末。\n"
        "Вчера вечером мы долго гуляли по набережной и обсуждали планы на летний отпуск.\n"
        "La réunion est reportée à jeudi prochain, car plusieurs membres de l'équipe sont en déplacement."
    ),
}

# Split patterns of the reference vocabularies (public facts about those encodings).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
REFERENCE_VOCABS = {
    # name: (file name, tiktoken's download URL (only used to find tiktoken's cache entry), pattern, special tokens)
    "gpt2": ("r50k_base.tiktoken", "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
             GPT2_PATTERN, {"<|endoftext|>": 50256}),
    "gpt4": ("cl100k_base.tiktoken", "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
             GPT4_PATTERN, {"<|endoftext|>": 100257}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate the run's tokenizer: bytes per token by domain vs HF / GPT-2 / GPT-4.")
    p.add_argument("--run-dir", required=True, help="run directory with tokenizer/ from tok_train")
    p.add_argument("--data-source", default="fineweb-edu", choices=sorted(dataset.SOURCES), help="corpus for the shard domains")
    p.add_argument("--data-dir", default=None, help="your own prepared shards instead")
    p.add_argument("--ref-vocab-dir", default=None,
                   help="folder with r50k_base.tiktoken / cl100k_base.tiktoken (default $NANOSTUDIO_CACHE/tiktoken)")
    p.add_argument("--no-hf-baseline", action="store_true", help="skip training the HF tokenizers baseline")
    return p.parse_args(argv)


def _find_reference_file(name: str, url: str, folder: Path) -> Path | None:
    candidates = [folder / name]
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    candidates.append(Path(cache) / hashlib.sha1(url.encode()).hexdigest())
    return next((c for c in candidates if c.is_file()), None)


def load_reference(name: str, folder: Path):
    """A tiktoken Encoding for GPT-2/GPT-4 if its file is on this machine, else None."""
    fname, url, pattern, specials = REFERENCE_VOCABS[name]
    path = _find_reference_file(fname, url, folder)
    if path is None:
        return None
    import base64

    import tiktoken

    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def hf_bpe_trainer(pattern: str, vocab_size: int):
    """An untrained HF tokenizer and BpeTrainer set up like ours: same split pattern, byte level, specials."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return tok, trainer


def train_hf_baseline(meta: dict, texts) -> "object":
    """HF tokenizers' BpeTrainer on the same text, vocabulary size, pattern and specials."""
    tok, trainer = hf_bpe_trainer(meta["pattern"], meta["vocab_size"])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def shard_samples(args) -> dict[str, str]:
    shards = dataset.pretrain_shards(args.data_source, 1, args.data_dir)
    import pyarrow.parquet as pq

    out = {}
    for label, path in (("train-shard", shards.train[0]), ("val-shard", shards.val)):
        table = pq.ParquetFile(path).read_row_group(0, columns=["text"])
        out[label] = [t for t in table.column("text").to_pylist() if t]
    return out, shards


def evaluate(args, events: EventWriter) -> dict:
    tok_dir = Path(args.run_dir) / "tokenizer"
    ours = Tokenizer.from_dir(tok_dir)
    meta = json.loads((tok_dir / "meta.json").read_text())
    texts = {domain: [text] for domain, text in SAMPLES.items()}
    shard_texts, shards = shard_samples(args)
    texts.update(shard_texts)

    # Each encoder maps a list of documents to their total token count; shard
    # domains are thousands of documents, encoded in parallel batches.
    encoders = {"ours": lambda docs: sum(map(len, ours.batch_encode(docs)))}
    notes = []
    if not args.no_hf_baseline:
        t0 = time.time()
        train_shards = dataset.text_shards(args.data_source, meta["max_chars"], args.data_dir)
        hf = train_hf_baseline(meta, dataset.iter_training_text(train_shards.train, meta["max_chars"], meta["doc_cap"]))
        encoders["hf"] = lambda docs: sum(len(e.ids) for e in hf.encode_batch(docs, add_special_tokens=False))
        notes.append(f"HF tokenizers BpeTrainer baseline trained on the same {meta['max_chars']:,} chars in {time.time() - t0:.1f}s "
                     f"(our Rust trainer: {meta['train_seconds']:.1f}s)")
    ref_dir = Path(args.ref_vocab_dir or Path(dataset.cache_root()) / "tiktoken")
    for name in REFERENCE_VOCABS:
        enc = load_reference(name, ref_dir)
        if enc is None:
            notes.append(f"{name} vocabulary not available locally (put {REFERENCE_VOCABS[name][0]} in {ref_dir})")
        else:
            encoders[name] = lambda docs, enc=enc: sum(map(len, enc.encode_ordinary_batch(docs)))

    rows = []
    for domain, docs in texts.items():
        nbytes = sum(len(d.encode("utf-8")) for d in docs)
        row = {"domain": domain, "bytes": nbytes, "chars": sum(map(len, docs)), "docs": len(docs)}
        for name, count in encoders.items():
            n = count(docs)
            row[f"{name}_tokens"] = n
            row[f"{name}_bytes_per_token"] = round(nbytes / max(n, 1), 4)
        for peer in encoders:
            if peer != "ours":
                # Positive = we need fewer tokens than the peer for the same text.
                row[f"vs_{peer}_pct"] = round(100 * (row[f"{peer}_tokens"] - row["ours_tokens"]) / max(row[f"{peer}_tokens"], 1), 2)
        rows.append(row)
    return {"rows": rows, "encoders": list(encoders), "notes": notes, "vocab_size": ours.vocab_size,
            "shard_origin": shards.origin}


def format_table(result: dict) -> str:
    encs = result["encoders"]
    head = "| domain | bytes | " + " | ".join(f"{e} B/tok" for e in encs) + "".join(f" | vs {e}" for e in encs if e != "ours") + " |"
    lines = [head, "|" + "---|" * (2 + len(encs) + len(encs) - 1)]
    for r in result["rows"]:
        cells = [r["domain"], f"{r['bytes']:,}"] + [f"{r[f'{e}_bytes_per_token']:.2f}" for e in encs]
        cells += [f"{r[f'vs_{e}_pct']:+.1f}%" for e in encs if e != "ours"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    with Stage(STAGE) as stage:
        stage.start(EventWriter(args.run_dir, STAGE), args=vars(args))
        result = evaluate(args, stage.events)
        write_json_atomic(Path(args.run_dir) / "tokenizer" / "eval.json", result)
        stage.events.emit("eval", name="tokenizer", **result)
        print(format_table(result))
        for note in result["notes"]:
            print("note:", note)
    return stage.exit_code


if __name__ == "__main__":
    sys.exit(main())
