"""GSM8K: answer extraction, the calculator tool-call rendering, and the data against our calculator."""

import gzip
import itertools
import re

import pytest

from tests.helpers import mirror
from tests.test_dataset import Server
from gpt.calculator import evaluate
from gpt.tokenizer import Tokenizer
from pipeline import dataset
from pipeline.dataset import DatasetError
from tasks import gsm8k
from trainer import tok_train


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv(dataset.MIRROR_ENV, str(mirror()))
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dataset.MIRROR_ENV, str(mirror()))
        assert tok_train.main(["--run-dir", str(run), "--vocab-size", "512", "--max-chars", "100000", "--doc-cap", "5000"]) == 0
    return Tokenizer.from_dir(run)


@pytest.mark.parametrize("text, expected", [
    ("so she has 72 left.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### 1,234,567.", "1234567"),       # a sentence's full stop is not a decimal point
    ("#### -5", "-5"),
    ("#### +7", "7"),
    ("####-3.25", "-3.25"),
    ("#### 3.50", "3.5"),
    ("#### 24.0", "24"),
    ("#### .5", "0.5"),
    ("#### -0", "0"),
    ("#### $1,000.00", "1000"),
    ("#### 100", "100"),                  # trailing zeros of an integer stay
    ("#### 5\n#### 6", "5"),              # several: the first
    ("#### five\nso #### 9", "9"),        # the first that has a number
    ("the answer is 42", None),           # no marker
    ("####", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_is_correct_compares_normalised_numbers():
    record = {"answer": "1200"}
    assert gsm8k.is_correct("blah\n#### 1,200", record)
    assert gsm8k.is_correct("#### 1200.00", record)
    assert not gsm8k.is_correct("1200", record)             # no marker, no answer
    assert not gsm8k.is_correct("#### 120\n#### 1200", record)


def test_splits_load_with_integer_answers():
    train, test = gsm8k.load("train"), gsm8k.load("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert all(re.fullmatch(r"-?\d+", r["answer"]) for r in train + test)
    first = gsm8k.load("train", seed=None)[0]
    assert first["id"] == "gsm8k/train/0" and first["answer"] == "72" and first["solution"].endswith("#### 72")
    assert [r["id"] for r in gsm8k.load("test", max_problems=10)] == [r["id"] for r in test[:10]]
    with pytest.raises(ValueError, match="'train'"):
        gsm8k.load("socratic")


NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_annotations_become_calculator_calls():
    record = {"question": "How many clips?", "solution": NATALIA, "answer": "72"}
    assert gsm8k.conversation(record) == {"messages": [{"role": "user", "content": "How many clips?"}]}
    assert gsm8k.conversation(record, with_answer=True)["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # Split at the last "=", adjacent annotations give no empty text part, one without "=" is dropped.
    assert gsm8k.solution_parts("<<a==b=1>><<2*3=6>> <<oops>>x") == [
        {"type": "python", "text": "a==b"}, {"type": "python_output", "text": "1"},
        {"type": "python", "text": "2*3"}, {"type": "python_output", "text": "6"}, {"type": "text", "text": " x"}]


def test_tool_calls_render_through_the_tokenizer(tok):
    record = {"question": "How many clips?", "solution": NATALIA, "answer": "72"}
    ids, mask = tok.render_conversation(gsm8k.conversation(record, with_answer=True))
    s = tok.special_ids
    call = [s["<|python_start|>"], *tok.encode("48/2"), s["<|python_end|>"]]
    output = [s["<|output_start|>"], *tok.encode("24"), s["<|output_end|>"]]
    at = next(i for i in range(len(ids)) if ids[i:i + len(call) + len(output)] == call + output)
    assert mask[at:at + len(call)] == [1] * len(call)                          # the model learns to call
    assert mask[at + len(call):at + len(call) + len(output)] == [0] * len(output)  # the tool answers
    assert tok.decode(ids).endswith("<|output_start|>72<|output_end|>72 clips altogether in April and May.\n#### 72<|assistant_end|>")
    prompt = tok.render_for_completion(gsm8k.conversation(record, with_answer=True))
    assert prompt == tok.render_for_completion(gsm8k.conversation(record)) and prompt[-1] == s["<|assistant_start|>"]


def test_parts_give_back_every_solution_in_the_mirror():
    for split in gsm8k.SPLITS:
        for record in gsm8k.load(split, seed=None):
            rebuilt, pending = "", None
            for part in gsm8k.solution_parts(record["solution"]):
                if part["type"] == "python":
                    pending = part["text"]
                elif part["type"] == "python_output":
                    rebuilt += f"<<{pending}={part['text']}>>"
                else:
                    rebuilt += part["text"]
            assert rebuilt == record["solution"], record["id"]


def test_the_calculator_agrees_with_every_training_annotation():
    total, refused, mismatches, reformatted = 0, [], [], 0
    for record in gsm8k.load("train", seed=None):
        parts = gsm8k.solution_parts(record["solution"])
        for call, output in itertools.pairwise(parts):
            if call["type"] != "python":
                continue
            total += 1
            got = evaluate(call["text"])
            if got is None:
                refused.append((record["id"], call["text"]))
            elif gsm8k.normalise_number(got) != gsm8k.normalise_number(output["text"]):
                mismatches.append((record["id"], call["text"], output["text"], got))
            else:
                reformatted += got != output["text"]
    # Measured on the mirror's train split: 23,716 annotations, every one evaluated, no value differs.
    # The annotations were made by a calculator too; 680 differ only in how they write the number
    # ("20.00" and ".5" where ours says "20" and "0.5"), which normalise_number absorbs. A handful of
    # mismatches would mean our calculator changed (rounding, refusals), not the data.
    assert total == 23716
    assert len(refused) <= 5, refused[:10]
    assert mismatches == [], mismatches[:10]
    assert 0 < reformatted < total * 0.05


def test_upstream_download_fills_the_cache_and_a_missing_file_names_every_place(monkeypatch, tmp_path):
    body = gzip.decompress((mirror() / "gsm8k" / "test.jsonl.gz").read_bytes())
    server = Server({"/test.jsonl": body})
    try:
        monkeypatch.delenv(dataset.MIRROR_ENV)
        monkeypatch.setattr(gsm8k, "URL", server.url + "/{split}.jsonl")
        assert len(gsm8k.load("test")) == 1319           # checked against the pinned SHA-256
        assert len(gsm8k.load("test")) == 1319           # second time from the cache
        assert [p for p, _ in server.requests] == ["/test.jsonl"]
        with pytest.raises(DatasetError) as err:
            gsm8k.load("train")
    finally:
        server.close()
    assert "cache/datasets/gsm8k/train.jsonl" in str(err.value) and server.url + "/train.jsonl" in str(err.value)
