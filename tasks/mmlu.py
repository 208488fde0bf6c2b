"""MMLU (Hendrycks et al.): four-choice questions in 57 subjects.

    from tasks import mmlu
    records = mmlu.load("test")                            # 14,042 records, shuffled with seed 42
    mmlu.load("dev", subjects=["anatomy"], seed=None)      # 5 records, file order
    mmlu.conversation(records[0], with_answer=True)        # prompt + letter (tasks/common.py)

Records: {id, subject, question, choices, letters, answer}. Splits:
dev 285 (5 per subject), val 1,531, test 14,042. Scored by the letter the
model gives (categorical), chance 0.25 (tasks/scores.py). The ~100K
"auxiliary_train" questions are not in the offline mirror; asking for them
raises an error that says where they live upstream.

Files: mmlu/{split}/{subject}_{split}.csv (headerless: question, A, B, C, D,
answer letter), as in Hendrycks' data.tar. Upstream, when neither the mirror
nor the cache has them, every split comes out of one zip of those CSVs
(mmlu.zip in hiyouga/LLaMA-Factory at a pinned commit), downloaded into the
cache and unpacked there once.
"""

from __future__ import annotations

import csv
import os
import zipfile

from pipeline import dataset
from tasks import common

SPLITS = ("dev", "val", "test")
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)
ZIP_URL = "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/465ee8119aa489a41bee0b01b3c105a2f3dd137f/evaluation/mmlu/mmlu.zip"
AUXILIARY_TRAIN = ("MMLU auxiliary_train is not in the offline mirror (no copy small enough was found); upstream it is "
                   "Hugging Face cais/mmlu, config 'all', split 'auxiliary_train', or "
                   "https://people.eecs.berkeley.edu/~hendrycks/data.tar (folder auxiliary_train/)")

conversation = common.mc_conversation
is_correct = common.mc_is_correct


def load(split: str = "test", subjects=None, max_problems: int | None = None, seed: int | None = 42) -> list[dict]:
    """The records of `split` over `subjects` (default all 57, in alphabetical order before the shuffle)."""
    if split == "auxiliary_train":
        raise dataset.DatasetError(AUXILIARY_TRAIN)
    common.check_choice("MMLU split", split, SPLITS)
    subjects = SUBJECTS if subjects is None else tuple(subjects)
    for subject in subjects:
        common.check_choice("MMLU subject", subject, SUBJECTS)
    records = []
    for subject in subjects:
        with _open(subject, split) as f:
            for i, row in enumerate(csv.reader(f)):
                records.append(_record(subject, split, i, row))
    return common.subset(records, max_problems, seed)


def _record(subject: str, split: str, i: int, row: list[str]) -> dict:
    if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
        raise ValueError(f"MMLU {subject}/{split} row {i + 1}: expected question, 4 choices and a letter A-D, got {row!r}")
    return common.mc_record(f"{subject}/{split}/{i}", row[0], row[1:5], "ABCD".index(row[5]), subject=subject)


def _open(subject: str, split: str):
    return common.open_data(f"mmlu/{split}/{subject}_{split}.csv", fetch=_unpack_upstream_zip)


def _unpack_upstream_zip() -> None:
    """Download the upstream zip into the cache and write its data/{split}/*.csv as mmlu/{split}/*.csv."""
    root = dataset.cache_root() / "datasets" / "mmlu"
    archive = dataset.download_file(ZIP_URL, root / "mmlu.zip")
    try:
        with zipfile.ZipFile(archive) as z:
            for split in SPLITS:
                for subject in SUBJECTS:
                    dest = root / split / f"{subject}_{split}.csv"
                    if dest.exists():
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(dest.name + ".tmp")
                    tmp.write_bytes(z.read(f"data/{split}/{subject}_{split}.csv"))
                    os.replace(tmp, dest)
    except (zipfile.BadZipFile, KeyError) as e:
        archive.unlink(missing_ok=True)  # so the next try downloads it again
        raise dataset.DatasetError(f"{ZIP_URL} is not the zip of MMLU CSVs expected: {e}") from None
