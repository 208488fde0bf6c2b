"""ARC (AI2 Reasoning Challenge, v1 Feb 2018): grade-school science multiple choice.

    from tasks import arc
    records = arc.load("ARC-Easy", "test")            # 2,376 records, shuffled with seed 42
    arc.conversation(records[0])                       # the multiple-choice prompt (tasks/common.py)
    arc.conversation(records[0], with_answer=True)     # + the assistant's letter, for training

Records: {id, question, choices, letters, answer}. Split sizes (train/dev/test):
ARC-Easy 2,251/570/2,376, ARC-Challenge 1,119/299/1,172. Scored by the
letter the model gives (categorical), chance 0.25 (tasks/scores.py).

Files: arc/{subset}/{subset}-{Train|Dev|Test}.jsonl in the mirror; upstream
the AI2 jsonl in pangr2/dataset_collection at a pinned commit.
"""

from __future__ import annotations

from tasks import common

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "dev", "test")
URL = ("https://raw.githubusercontent.com/pangr2/dataset_collection/52d6686c0aef1a55241f3fc8f42345b1af9ce544/"
       "ARC-V1-Feb2018/ARC-V1-Feb2018-2/{subset}/{subset}-{split}.jsonl")
SHA256 = {  # of the upstream (uncompressed) files, as the data mirror's manifest.json records them
    ("ARC-Easy", "train"): "c62e5482d8c01f2d5a7f24239ac9db3b12f9e47267c4e3f088c6ffe41d5545ef",
    ("ARC-Easy", "dev"): "f4364b808a68df6bf500ce1070fb0105d40cacd2391c210deb00ff83ba75d1f4",
    ("ARC-Easy", "test"): "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    ("ARC-Challenge", "train"): "e02837c53ee86f6d73c259f91c77725c5062ef4531130b7f473a9d9b01118a77",
    ("ARC-Challenge", "dev"): "55224364abd2477f66a9a57c5cbef109fb71d83019aa5e37aec0e7ab757746ca",
    ("ARC-Challenge", "test"): "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
}

conversation = common.mc_conversation
is_correct = common.mc_is_correct


def load(subset: str = "ARC-Easy", split: str = "test", max_problems: int | None = None, seed: int | None = 42) -> list[dict]:
    """The records of one subset and split; see tasks/common.py for the shuffle and cut."""
    common.check_choice("ARC subset", subset, SUBSETS)
    common.check_choice("ARC split", split, SPLITS)
    name = f"{subset}-{split.capitalize()}.jsonl"
    rows = common.read_jsonl(f"arc/{subset}/{name}", URL.format(subset=subset, split=split.capitalize()), SHA256[subset, split])
    return common.subset(map(_record, rows), max_problems, seed)


def _record(row: dict) -> dict:
    choices = row["question"]["choices"]
    labels = [c["label"] for c in choices]
    if row["answerKey"] not in labels:
        raise ValueError(f"ARC {row['id']}: answer {row['answerKey']!r} is not one of the labels {labels}")
    # Labels come as A-E or 1-4, always in order: the answer is kept by position.
    return common.mc_record(row["id"], row["question"]["stem"], [c["text"] for c in choices], labels.index(row["answerKey"]))
