"""HumanEval: loading, code extraction, program assembly, and grading in the sandbox."""

import pytest

from tests.helpers import mirror
from tests.test_dataset import Server
from pipeline import dataset
from tasks import humaneval


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv(dataset.MIRROR_ENV, str(mirror()))
    monkeypatch.setenv(dataset.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def problems():
    return {r["task_id"]: r for r in humaneval.load(seed=None)}


def canonical(record):
    return record["prompt"] + record["canonical_solution"]


def test_load_gives_the_164_problems(problems):
    assert list(problems) == [f"HumanEval/{i}" for i in range(164)]
    assert all(set(r) == set(humaneval.FIELDS) for r in problems.values())
    some = humaneval.load(max_problems=10)
    assert len(some) == 10 and [r["task_id"] for r in some] == [r["task_id"] for r in humaneval.load()[:10]]


@pytest.mark.parametrize("answer, code", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```python\na = 1\n```\n```python\nb = 2\n```", "a = 1\n"),           # the first block
    ("```py\nx = 3\n```", "x = 3\n"),
    ("```\nx = 4\n```", "x = 4\n"),                                        # a bare fence is code too
    ("```python\ndef g():\n    pass", "def g():\n    pass"),                # cut off before the closing fence
    ("def h():\n    return 2\n", "def h():\n    return 2\n"),              # no fence: the whole answer
    ("", ""),
])
def test_extract_code(answer, code):
    assert humaneval.extract_code(answer) == code


def test_program_is_imports_completion_test_and_check(problems):
    record = problems["HumanEval/0"]
    assert humaneval.leading_imports(record["prompt"]) == "from typing import List"
    text = humaneval.program(record, "def has_close_elements(numbers, threshold):\n    return False")
    assert text.startswith("from typing import List\n\ndef has_close_elements(numbers, threshold):\n    return False\n\n")
    assert record["test"] in text and text.endswith("\n\ncheck(has_close_elements)\n")
    assert humaneval.leading_imports("# a comment\nimport math\n\nfrom x import y\ndef f():\n    import os\n") == "import math\nfrom x import y"


def test_conversation_answers_with_the_reference_function(problems):
    record = problems["HumanEval/2"]
    conv = humaneval.conversation(record, with_answer=True)
    assert conv["messages"][0] == {"role": "user", "content": record["prompt"]}
    assert conv["messages"][1]["content"] == canonical(record)
    assert humaneval.conversation(record) == {"messages": conv["messages"][:1]}


def test_right_wrong_empty_and_endless_completions(problems):
    record = problems["HumanEval/0"]
    assert humaneval.run(record, canonical(record)).ok
    wrong = humaneval.run(record, "def has_close_elements(numbers, threshold):\n    return False\n")
    assert not wrong.ok and "AssertionError" in wrong.stderr
    empty = humaneval.run(record, "")
    assert not empty.ok and "NameError" in empty.stderr
    endless = humaneval.run(record, "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n", timeout=1.0)
    assert not endless.ok and endless.timed_out


def test_pool_keeps_the_order(problems):
    records = [problems[f"HumanEval/{i}"] for i in range(3)]
    pairs = [pair for r in records for pair in ((r, canonical(r)), (r, "pass"))]
    assert [res.ok for res in humaneval.run_many(pairs, workers=3)] == [True, False] * 3
    assert humaneval.run_many([], workers=2) == []


@pytest.mark.slow
def test_every_canonical_solution_passes_in_the_sandbox(problems):
    results = humaneval.run_many([(r, canonical(r)) for r in problems.values()], workers=4)
    failed = [(task, res.stderr[-300:]) for task, res in zip(problems, results) if not res.ok]
    assert failed == []


def test_the_gzipped_file_comes_from_upstream_into_the_cache(monkeypatch):
    server = Server({"/HumanEval.jsonl.gz": (mirror() / "humaneval" / "HumanEval.jsonl.gz").read_bytes()})
    try:
        monkeypatch.delenv(dataset.MIRROR_ENV)
        monkeypatch.setattr(humaneval, "URL", server.url + "/HumanEval.jsonl.gz")
        assert len(humaneval.load()) == 164     # decompressed although it was just downloaded
        assert len(humaneval.load()) == 164     # and from the cache afterwards
        assert [p for p, _ in server.requests] == ["/HumanEval.jsonl.gz"]
    finally:
        server.close()
