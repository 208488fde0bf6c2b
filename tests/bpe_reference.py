"""A small, deliberately naive pure-Python byte-level BPE, used to check ``bpe_rust``.

Same rules as bpe_rust (see its ``Tokenizer`` docstring):

* pre-split each text with the ``regex`` package (``finditer``; text between matches is a
  chunk of its own, like HF ``Split(behavior="Isolated")``), count unique chunks as bytes;
* each step recounts ALL adjacent pairs of all chunks (times the chunk count) and merges
  the pair with the highest count, ties going to the smallest ``(left_id, right_id)``;
* a merge is applied left to right without overlap;
* if the merged bytes already are a token, the merge is recorded with that existing id and
  no new id is made;
* stop when the vocabulary (bytes + merged tokens) has ``vocab_size - len(specials)``
  tokens or no pair is left.

Encoding: per chunk, repeatedly merge the leftmost occurrence of the pair with the lowest
merge rank (a pair recorded twice keeps its first rank).
"""

from __future__ import annotations

from collections import Counter

import regex


def split(text: str, pattern: str) -> list[str]:
    chunks = []
    last = 0
    for m in regex.finditer(pattern, text):
        if m.start() > last:
            chunks.append(text[last : m.start()])
        if m.end() > m.start():
            chunks.append(m.group())
        last = m.end()
    if last < len(text):
        chunks.append(text[last:])
    return chunks


def count_chunks(texts, pattern: str) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        counts.update(c.encode("utf-8") for c in split(t, pattern))
    return counts


def merge_word(word: tuple, a: int, b: int, new: int) -> tuple:
    out = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train(texts, vocab_size: int, pattern: str, n_specials: int):
    """Returns (merges, vocab): merges as (left, right, new_id), vocab as list of bytes."""
    counts = count_chunks(texts, pattern)
    words = [(tuple(chunk), n) for chunk, n in counts.items() if len(chunk) >= 2]
    vocab = [bytes([i]) for i in range(256)]
    ids = {v: i for i, v in enumerate(vocab)}
    merges = []
    while len(vocab) < vocab_size - n_specials:
        pair_counts: Counter = Counter()
        for word, n in words:
            for pair in zip(word, word[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        # highest count; among equal counts the smallest (left, right)
        (a, b), n = max(pair_counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        if n <= 0:
            break
        merged = vocab[a] + vocab[b]
        if merged in ids:
            new = ids[merged]
        else:
            new = len(vocab)
            vocab.append(merged)
            ids[merged] = new
        merges.append((a, b, new))
        words = [(merge_word(w, a, b, new) if a in w else w, n) for w, n in words]
    return merges, vocab


def encode(text: str, merges, pattern: str) -> list[int]:
    ranks = {}
    for rank, (a, b, new) in enumerate(merges):
        ranks.setdefault((a, b), (rank, new))
    out = []
    for chunk in split(text, pattern):
        word = list(chunk.encode("utf-8"))
        while len(word) > 1:
            best = None
            for i in range(len(word) - 1):
                r = ranks.get((word[i], word[i + 1]))
                if r is not None and (best is None or r[0] < best[0]):
                    best = (r[0], i, r[1])
            if best is None:
                break
            _, i, new = best
            word[i : i + 2] = [new]
        out.extend(word)
    return out
