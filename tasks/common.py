"""What the task modules share: finding a data file, deterministic subsets, the multiple-choice prompt.

Data files are named by their path in the mirror layout (see
pipeline/dataset.py): the mirror (``NANOSTUDIO_DATA_MIRROR``) wins, then the
cache (``NANOSTUDIO_CACHE``/datasets), then the pinned upstream file is
downloaded into the cache. Upstream URLs point at a fixed commit, so the
SHA-256 of each file is known and checked (not for MMLU's zip, whose hash
the mirror's manifest does not record).

Subsets: ``subset(records, max_problems, seed)`` shuffles a copy with
``random.Random(seed)`` (stable across Python versions for an int seed) and
keeps the first ``max_problems``; a larger ``max_problems`` with the same seed
gives a superset. ``seed=None`` keeps the file's order. Every ``load()``
defaults to seed 42. The order is our own: it does not reproduce the
reference project's Hugging Face shuffle.

Multiple choice (ARC, MMLU) records are dicts
``{id, question, choices, letters, answer}``; letters are always A, B, C...
in the order the choices come (ARC's numeric labels 1-4 become A-D), and the
prompt puts the letter after its choice with no space, because a small
model's token for "A" differs from " A":

    Multiple Choice question: {question}
    - {choice}={letter}
    ...

    Respond only with the letter of the correct answer.
"""

from __future__ import annotations

import json
import random
import string

from pipeline import dataset

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Respond only with the letter of the correct answer."


def open_data(mirror_path: str, url: str | None = None, sha256: str | None = None, *, fetch=None):
    """A text file object for `mirror_path`: the mirror, the cache, else fetched from upstream into the cache.

    Upstream is `url` (checked against `sha256`), or `fetch()`, a callable
    that puts the file into the cache (MMLU unpacks an archive). A `.gz` path
    is decompressed wherever it comes from. When the file is nowhere, one
    DatasetError names every place looked in and why the fetch failed.
    """
    dataset.mirror_root()  # a mistyped mirror is an error of its own, not a reason to download
    try:
        return dataset.open_text(mirror_path)
    except dataset.DatasetError as missing:
        if url is None and fetch is None:
            raise
        try:
            if fetch is None:
                dataset.download_file(url, dataset.cache_root() / "datasets" / mirror_path, sha256=sha256)
            else:
                fetch()
        except dataset.DatasetError as failed:
            raise dataset.DatasetError(f"{missing} Fetching it from upstream failed too: {failed}") from None
    return dataset.open_text(mirror_path)  # now in the cache; a .gz is opened as gzip


def read_jsonl(mirror_path: str, url: str | None = None, sha256: str | None = None) -> list[dict]:
    with open_data(mirror_path, url, sha256) as f:
        return [json.loads(line) for line in f if line.strip()]


def subset(records, max_problems: int | None = None, seed: int | None = 42) -> list:
    """A deterministic shuffle (seed None: file order) cut to the first `max_problems`."""
    records = list(records)
    if max_problems is not None and max_problems < 0:
        raise ValueError(f"max_problems must be >= 0, got {max_problems}")
    if seed is not None:
        random.Random(seed).shuffle(records)
    return records if max_problems is None else records[:max_problems]


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, allowed))}")


def render_mc(question: str, choices: list[str], letters: str | list[str] | None = None) -> str:
    """The multiple-choice user prompt (format in this module's docstring)."""
    letters = letters or LETTERS[:len(choices)]
    lines = "".join(f"- {choice}={letter}\n" for choice, letter in zip(choices, letters, strict=True))
    return f"Multiple Choice question: {question}\n{lines}\n{MC_INSTRUCTION}"


def mc_record(id: str, question: str, choices: list[str], answer_index: int, **extra) -> dict:
    letters = list(LETTERS[:len(choices)])
    return {"id": id, **extra, "question": question, "choices": list(choices), "letters": letters,
            "answer": letters[answer_index]}


def mc_conversation(record: dict, with_answer: bool = False) -> dict:
    """The user's prompt, and with_answer the assistant's letter (for training)."""
    messages = [{"role": "user", "content": render_mc(record["question"], record["choices"], record["letters"])}]
    if with_answer:
        messages.append({"role": "assistant", "content": record["answer"]})
    return {"messages": messages}


def mc_is_correct(prediction: str, record: dict) -> bool:
    """The predicted letter (surrounding whitespace ignored) is the answer."""
    return prediction.strip() == record["answer"]
