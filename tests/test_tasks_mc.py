"""ARC and MMLU: loading from the mirror, split sizes, the multiple-choice prompt, subsets, upstream fallback."""

import io
import json
import zipfile

import pytest

from tests.helpers import mirror
from tests.test_dataset import Server
from pipeline import dataset
from pipeline.dataset import DatasetError
from tasks import arc, common, mmlu


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv(dataset.MIRROR_ENV, str(mirror()))
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path / "cache"))


def manifest_counts(prefix: str) -> int:
    rows = json.loads((mirror() / "manifest.json").read_text())
    return sum(r["count"] for r in rows if r["path"].startswith(prefix))


# The sizes the MANIFEST documents, per split.
ARC_SIZES = {"ARC-Easy": {"train": 2251, "dev": 570, "test": 2376}, "ARC-Challenge": {"train": 1119, "dev": 299, "test": 1172}}
MMLU_SIZES = {"dev": 285, "val": 1531, "test": 14042}


@pytest.mark.parametrize("subset", arc.SUBSETS)
def test_arc_split_sizes_match_the_manifest(subset):
    for split, size in ARC_SIZES[subset].items():
        records = arc.load(subset, split)
        assert len(records) == size == manifest_counts(f"arc/{subset}/{subset}-{split.capitalize()}.")
        assert len({r["id"] for r in records}) == size
        for r in records:
            assert r["letters"] == list("ABCDE"[:len(r["choices"])]) and r["answer"] in r["letters"]


def test_mmlu_split_sizes_match_the_manifest_and_subjects_match_the_files():
    for split, size in MMLU_SIZES.items():
        records = mmlu.load(split)
        assert len(records) == size == manifest_counts(f"mmlu/{split}/")
        assert {r["subject"] for r in records} == set(mmlu.SUBJECTS)
        assert all(len(r["choices"]) == 4 and r["answer"] in "ABCD" for r in records)
    on_disk = sorted(p.name.removesuffix("_test.csv.gz") for p in (mirror() / "mmlu" / "test").iterdir())
    assert on_disk == list(mmlu.SUBJECTS)
    assert len(mmlu.load("dev", subjects=["anatomy"])) == 5


def test_arc_prompt_is_byte_exact():
    record = next(r for r in arc.load("ARC-Easy", "test", seed=None) if r["id"] == "Mercury_417466")
    expected = (
        "Multiple Choice question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
        "- Sunlight is the source of energy for nearly all ecosystems.=A\n"
        "- Most ecosystems are found on land instead of in water.=B\n"
        "- Carbon dioxide is more available than other gases.=C\n"
        "- The producers in all ecosystems are plants.=D\n"
        "\n"
        "Respond only with the letter of the correct answer."
    )
    assert arc.conversation(record) == {"messages": [{"role": "user", "content": expected}]}
    assert arc.conversation(record, with_answer=True)["messages"][1] == {"role": "assistant", "content": "A"}


def test_arc_numeric_labels_become_letters_by_position():
    record = next(r for r in arc.load("ARC-Easy", "test", seed=None) if r["id"] == "NYSEDREGENTS_2015_8_28")
    assert record["choices"] == ["air", "elements", "water", "soil"] and record["answer"] == "B"
    assert "- elements=B\n" in arc.conversation(record)["messages"][0]["content"]


def test_mmlu_prompt_is_byte_exact_with_quoted_csv_fields():
    record = mmlu.load("test", subjects=["abstract_algebra"], seed=None)[2]
    assert record["id"] == "abstract_algebra/test/2" and record["subject"] == "abstract_algebra"
    expected = (
        "Multiple Choice question: Find all zeros in the indicated finite field of the given polynomial with "
        "coefficients in that field. x^5 + 3x^3 + x^2 + 2x in Z_5\n"
        "- 0=A\n- 1=B\n- 0,1=C\n- 0,4=D\n\nRespond only with the letter of the correct answer."
    )
    assert mmlu.conversation(record)["messages"][0]["content"] == expected
    assert mmlu.conversation(record, with_answer=True)["messages"][1]["content"] == "D"
    assert mmlu.is_correct(" D\n", record) and not mmlu.is_correct("C", record)


def test_five_choices_get_five_letters():
    assert common.render_mc("q?", ["a", "b", "c", "d", "e"]).splitlines()[1:6] == ["- a=A", "- b=B", "- c=C", "- d=D", "- e=E"]


def ids(records):
    return [r["id"] for r in records]


def test_subsets_are_deterministic_nested_and_seeded():
    file_order = ids(arc.load("ARC-Challenge", "dev", seed=None))
    a = ids(arc.load("ARC-Challenge", "dev", max_problems=50))
    assert a == ids(arc.load("ARC-Challenge", "dev", max_problems=50, seed=42))
    assert a == ids(arc.load("ARC-Challenge", "dev", max_problems=120))[:50]  # a bigger subset contains it
    assert a != ids(arc.load("ARC-Challenge", "dev", max_problems=50, seed=7)) and a != file_order[:50]
    assert sorted(ids(arc.load("ARC-Challenge", "dev"))) == sorted(file_order)
    assert ids(arc.load("ARC-Challenge", "dev", max_problems=5, seed=None)) == file_order[:5]
    assert arc.load("ARC-Challenge", "dev", max_problems=0) == []
    # What seed 42 picks is part of the contract (random.Random(42).shuffle of the file order): pinned here.
    assert a[:3] == ["Mercury_7085820", "MCAS_2010_8_12010", "Mercury_7267593"]
    assert ids(mmlu.load("dev", max_problems=3)) == ["conceptual_physics/dev/1", "high_school_microeconomics/dev/4", "marketing/dev/3"]
    with pytest.raises(ValueError, match="max_problems"):
        common.subset([1, 2], -1)


def test_unknown_names_and_missing_splits_say_what_exists():
    with pytest.raises(ValueError, match="ARC-Challenge"):
        arc.load("ARC-Hard")
    with pytest.raises(ValueError, match="'dev'"):
        arc.load("ARC-Easy", "validation")
    with pytest.raises(ValueError, match="abstract_algebra"):
        mmlu.load("dev", subjects=["astrology"])
    with pytest.raises(DatasetError, match="auxiliary_train is not in the offline mirror.*cais/mmlu"):
        mmlu.load("auxiliary_train")


def test_arc_missing_everywhere_names_every_place(monkeypatch, tmp_path):
    server = Server({})
    try:
        monkeypatch.setenv(dataset.MIRROR_ENV, str(tmp_path / "empty-mirror"))
        (tmp_path / "empty-mirror").mkdir()
        monkeypatch.setattr(arc, "URL", server.url + "/{subset}-{split}.jsonl")
        with pytest.raises(DatasetError) as err:
            arc.load("ARC-Easy", "dev")
    finally:
        server.close()
    text = str(err.value)
    for place in ("empty-mirror/arc/ARC-Easy/ARC-Easy-Dev.jsonl", "cache/datasets/arc/ARC-Easy/ARC-Easy-Dev.jsonl.gz",
                  server.url + "/ARC-Easy-Dev.jsonl", "404"):
        assert place in text


def test_mmlu_comes_from_the_upstream_zip_into_the_cache_once(monkeypatch, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for split in mmlu.SPLITS:
            for subject in mmlu.SUBJECTS:
                z.writestr(f"data/{split}/{subject}_{split}.csv", f'"What is {subject}, {split}?",w,x,y,z,C\n')
    server = Server({"/mmlu.zip": buffer.getvalue()})
    try:
        monkeypatch.delenv(dataset.MIRROR_ENV)
        monkeypatch.setattr(mmlu, "ZIP_URL", server.url + "/mmlu.zip")
        records = mmlu.load("val", seed=None)
        assert len(records) == 57 and records[0]["question"] == "What is abstract_algebra, val?" and records[0]["answer"] == "C"
        assert len(mmlu.load("test")) == 57
        assert [p for p, _ in server.requests] == ["/mmlu.zip"]
        assert (tmp_path / "cache" / "datasets" / "mmlu" / "dev" / "virology_dev.csv").exists()
    finally:
        server.close()


def test_a_bad_upstream_zip_is_named_and_not_kept(monkeypatch, tmp_path):
    server = Server({"/mmlu.zip": b"this is not a zip"})
    try:
        monkeypatch.delenv(dataset.MIRROR_ENV)
        monkeypatch.setattr(mmlu, "ZIP_URL", server.url + "/mmlu.zip")
        with pytest.raises(DatasetError, match="mmlu/dev/abstract_algebra_dev.csv.*mmlu.zip is not the zip"):
            mmlu.load("dev")
    finally:
        server.close()
    assert not (tmp_path / "cache" / "datasets" / "mmlu" / "mmlu.zip").exists()


def test_a_mistyped_mirror_is_an_error_not_a_download(monkeypatch, tmp_path):
    server = Server({})
    try:
        monkeypatch.setenv(dataset.MIRROR_ENV, str(tmp_path / "no-such-folder"))
        monkeypatch.setattr(arc, "URL", server.url + "/{subset}-{split}.jsonl")
        with pytest.raises(DatasetError, match="NANOSTUDIO_DATA_MIRROR=.*no-such-folder is not a directory"):
            arc.load()
        assert server.requests == []
    finally:
        server.close()
