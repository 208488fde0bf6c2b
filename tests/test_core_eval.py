"""CORE (tasks/core.py, evals/core.py): the task table, sampling, prompts, spans, cropping, scoring, batching."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from evals import core as core_eval
from tasks import core
from tasks.core import LANGUAGE_MODELING, MULTIPLE_CHOICE, SCHEMA, CoreTask
from tests.helpers import mirror

V = 128  # the fake tokenizer's vocabulary: one token per ASCII character
BOS = 1


class CharTokenizer:
    """One token per character (its code point), BOS = 1: token boundaries are obvious in the tests."""

    bos_id = BOS

    def batch_encode(self, texts, prepend=None):
        return [([prepend] if prepend is not None else []) + [ord(c) for c in t] for t in texts]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def copy_model(ids: torch.Tensor) -> torch.Tensor:
    """Logits that predict "the next token repeats this one": +10 on the current token, 0 elsewhere."""
    logits = torch.zeros(*ids.shape, V)
    logits.scatter_(-1, ids.unsqueeze(-1), 10.0)
    return logits


HIT = math.log(math.exp(10) + V - 1) - 10  # loss of the token the copy model predicts
MISS = math.log(math.exp(10) + V - 1)  # loss of any other token


def task(kind, shots=0, delimiter="", baseline=25.0):
    return CoreTask("toy", kind, shots, delimiter, baseline, "local_data/toy/toy.jsonl")


def run(kind, examples, **kw):
    kw = {"max_len": 1000, "token_budget": 10_000, **kw}
    return core_eval.evaluate_task(copy_model, CharTokenizer(), task(kind, kw.pop("shots", 0), kw.pop("delimiter", "")),
                                   examples, **kw)


# --- the task table ---------------------------------------------------------------------------

def test_the_task_table_matches_the_mirrors_core_tasks_csv():
    """The project's copy of the 22 tasks agrees with the data mirror's table (v1 baselines)."""
    with open(mirror() / "core" / "core_tasks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [t.label for t in core.TASKS] and len(core.TASKS) == 22
    for row, t in zip(rows, core.TASKS):
        assert (t.kind, t.shots, t.delimiter, t.baseline) == (
            row["icl_task_type"], int(row["num_fewshot"]), json.loads(row["continuation_delimiter_json"]),
            float(row["random_baseline_pct_nanochat_v1"])), t.label
        assert t.uri == row["dclm_dataset_uri"]
        if row["file_in_shared_data"]:
            assert row["file_in_shared_data"] == t.path + ".gz"
    assert core.get("arc_easy").url.endswith("/scripts/eval/local_data/world_knowledge/arc_easy.jsonl")
    with pytest.raises(KeyError, match="known: hellaswag_zeroshot"):
        core.get("arc_eazy")


def test_tasks_load_from_the_mirror_and_missing_ones_say_where_they_were_looked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOSTUDIO_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("NANOSTUDIO_CACHE", str(tmp_path / "cache"))
    copa = core.load(core.get("copa"))
    assert len(copa) == 100 and set(copa[0]) >= {"query", "choices", "gold"}
    with pytest.raises(core.TaskMissing, match=r"reading_comprehension/squad.jsonl is in neither.*downloaded from https://raw"):
        core.load(core.get("squad"))  # with a mirror nothing is downloaded
    assert not (tmp_path / "cache" / "datasets" / "core").exists()


def test_select_shuffles_with_seed_1337_and_a_smaller_crop_is_a_prefix():
    items = list(range(50))
    assert core.select(items) == core.select(items, -1) == core.select(items, 0)
    assert sorted(core.select(items)) == items and core.select(items) != items
    assert core.select(items, 10) == core.select(items)[:10] == core.select(items, 20)[:10]
    import random

    expected = list(items)
    random.Random(1337).shuffle(expected)
    assert core.select(items, 5) == expected[:5]


def test_fewshot_examples_are_deterministic_and_never_the_item():
    for index in range(30):
        picked = core.fewshot_indices(index, 30, 10)
        assert picked == core.fewshot_indices(index, 30, 10)
        assert len(picked) == len(set(picked)) == 10 and index not in picked and all(0 <= i < 30 for i in picked)
    assert core.fewshot_indices(0, 30, 10) != core.fewshot_indices(1, 30, 10)
    assert sorted(core.fewshot_indices(2, 4, 10)) == [0, 1, 3]  # fewer examples than shots: all the others
    assert core.fewshot_indices(0, 1, 10) == [] and core.fewshot_indices(5, 30, 0) == []


def test_centering_and_the_core_label():
    assert core.centered(0.25, 25.0) == 0.0 and core.centered(1.0, 62.0) == 1.0
    assert core.centered(0.40, 25.0) == pytest.approx(0.2)
    assert core.centered(0.5813, 62.0) == pytest.approx(-0.1018, abs=1e-4)  # boolq below its baseline goes negative
    assert core.core_score({}) == (None, "CORE (0/22)")
    score, label = core.core_score({"a": 0.2, "b": 0.4})
    assert score == pytest.approx(0.3) and label == "CORE (2/22)"
    assert core.core_label(22) == "CORE"


# --- prompts ----------------------------------------------------------------------------------

def test_prompts_are_byte_exact_for_each_task_type():
    mc = task(MULTIPLE_CHOICE, delimiter="\nAnswer: ")
    shots = [{"query": "Question: 1+1?", "choices": ["1", "2"], "gold": 1}, {"query": "Q: sky?", "choices": ["blue"], "gold": 0}]
    assert core_eval.render_prompts(mc, {"query": "Question: 2+2?", "choices": ["4", "5"]}, shots) == [
        "Question: 1+1?\nAnswer: 2\n\nQ: sky?\nAnswer: blue\n\nQuestion: 2+2?\nAnswer: 4",
        "Question: 1+1?\nAnswer: 2\n\nQ: sky?\nAnswer: blue\n\nQuestion: 2+2?\nAnswer: 5",
    ]
    schema = task(SCHEMA, delimiter=" ")
    shots = [{"context_options": ["Ann hid because Ann", "Ann hid because Bo"], "continuation": "was scared.", "gold": 0}]
    item = {"context_options": ["Cy ran as Cy", "Cy ran as Di"], "continuation": "was late.", "gold": 1}
    assert core_eval.render_prompts(schema, item, shots) == [
        "Ann hid because Ann was scared.\n\nCy ran as Cy was late.",
        "Ann hid because Ann was scared.\n\nCy ran as Di was late.",
    ]
    lm = task(LANGUAGE_MODELING, delimiter=" ")
    shots = [{"context": "  The capital of France is ", "continuation": "Paris"}]
    assert core_eval.render_prompts(lm, {"context": "Water is\n", "continuation": "wet"}, shots) == [
        "The capital of France is Paris\n\nWater is",  # without the continuation: stripped
        "The capital of France is Paris\n\nWater is wet",
    ]
    assert core_eval.render_prompts(task(LANGUAGE_MODELING, delimiter="\nAnswer: "), {"context": "Q", "continuation": "A"}, []) == \
        ["Q\nAnswer:", "Q\nAnswer: A"]


def test_continuation_spans_per_type():
    # multiple choice: after the common prefix; schema: the common suffix; LM: after the prompt without it
    assert core_eval.continuation_spans(MULTIPLE_CHOICE, [[1, 5, 6, 7], [1, 5, 6, 8, 9]]) == [([1, 5, 6, 7], 3, 4), ([1, 5, 6, 8, 9], 3, 5)]
    assert core_eval.continuation_spans(SCHEMA, [[1, 5, 7, 8], [1, 6, 6, 7, 8]]) == [([1, 5, 7, 8], 2, 4), ([1, 6, 6, 7, 8], 3, 5)]
    assert core_eval.continuation_spans(LANGUAGE_MODELING, [[1, 5, 6], [1, 5, 6, 7, 8]]) == [([1, 5, 6, 7, 8], 3, 5)]
    # the tokenizer merged across the boundary: the continuation starts where the two prompts part
    assert core_eval.continuation_spans(LANGUAGE_MODELING, [[1, 5, 6], [1, 5, 9, 8]]) == [([1, 5, 9, 8], 2, 4)]
    # a choice that is a prefix of another still scores at least its last token
    assert core_eval.continuation_spans(MULTIPLE_CHOICE, [[1, 5], [1, 5, 6]]) == [([1, 5], 1, 2), ([1, 5, 6], 2, 3)]


def test_left_cropping_keeps_the_end_and_moves_the_span():
    tokens = list(range(1, 11))
    assert core_eval.crop_left(tokens, 7, 10, 16) == (tokens, 7, 10, 0)
    assert core_eval.crop_left(tokens, 7, 10, 5) == ([6, 7, 8, 9, 10], 2, 5, 5)
    assert core_eval.crop_left(tokens, 3, 10, 4) == ([7, 8, 9, 10], 1, 4, 6)  # the continuation itself is cut


# --- scoring ----------------------------------------------------------------------------------

def test_multiple_choice_picks_the_lowest_mean_continuation_loss():
    examples = [{"query": "xa", "choices": ["aaa", "abc", "bbb"], "gold": 0},
                {"query": "xb", "choices": ["aaa", "bbb"], "gold": 0}]
    result = run(MULTIPLE_CHOICE, examples)
    first, second = result.records
    assert first["predicted"] == 0 and first["correct"]
    assert first["losses"] == pytest.approx([HIT, (HIT + 2 * MISS) / 3, (MISS + 2 * HIT) / 3], abs=1e-4)
    assert second["predicted"] == 1 and not second["correct"]
    assert (result.correct, result.count, result.accuracy) == (1, 2, 0.5)
    assert result.centered == pytest.approx((0.5 - 0.25) / 0.75)


def test_schema_picks_the_context_under_which_the_shared_continuation_is_likeliest():
    examples = [{"context_options": ["qa", "qb"], "continuation": "aa", "gold": 0},
                {"context_options": ["qa", "qb"], "continuation": "bb", "gold": 0}]
    result = run(SCHEMA, examples)
    assert [r["predicted"] for r in result.records] == [0, 1]
    assert result.records[0]["losses"] == pytest.approx([HIT, (MISS + HIT) / 2], abs=1e-4)
    assert result.correct == 1


def test_language_modelling_needs_every_continuation_token_from_greedy_decoding():
    examples = [{"context": "xb", "continuation": "bb"},  # the copy model continues b with b: right
                {"context": "xb", "continuation": "bc"},  # one token wrong: the whole example is wrong
                {"context": "xc", "continuation": "c"}]
    result = run(LANGUAGE_MODELING, examples)
    assert [r["correct"] for r in result.records] == [True, False, True]
    assert [r["predicted"] for r in result.records] == ["bb", "bb", "c"]
    assert result.records[1]["gold"] == "bc" and result.records[1]["continuation_tokens"] == 2


def test_left_cropped_sequences_are_scored_on_what_fits():
    examples = [{"context": "x" * 50 + "b", "continuation": "bb"}]
    result = run(LANGUAGE_MODELING, examples, max_len=8)
    assert result.records[0]["tokens"] == [8] and result.records[0]["cropped"] == 54 - 8 and result.correct == 1


def test_few_shot_examples_come_from_the_other_examples():
    examples = [{"context": f"c{i}", "continuation": str(i)} for i in range(12)]
    result = run(LANGUAGE_MODELING, examples, shots=3)
    for r in result.records:
        assert r["fewshot"] == core.fewshot_indices(r["index"], 12, 3) and r["index"] not in r["fewshot"]
        # BOS, then three shots "c{j}{j}\n\n" before the item's "c{i}{i}"
        assert r["tokens"] == [1 + sum(len(f"c{j}{j}\n\n") for j in r["fewshot"]) + len(f"c{r['index']}{r['index']}")]


def test_plan_batches_packs_longest_first_within_the_token_budget():
    assert core_eval.plan_batches([3, 10, 4, 9, 1], 20) == [[1, 3], [2, 0, 4]]
    assert core_eval.plan_batches([30, 2], 20) == [[0], [1]]  # a row longer than the budget still goes alone
    assert core_eval.plan_batches([], 20) == []


@pytest.fixture(scope="module")
def tiny_model(torch_one_thread):
    from gpt.model import GPTConfig, build_model

    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=64, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32), "cpu")
    with torch.no_grad():
        for p in model.parameters():  # build_model zeroes the head and output projections: every choice would tie
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def test_batching_gives_the_answers_of_one_sequence_per_forward(tiny_model):
    """Many examples per forward (sorted, padded) score exactly like one sequence per forward."""
    tasks = {
        MULTIPLE_CHOICE: [{"query": f"q{i} ", "choices": ["yes", "no", "maybe so"][: 2 + i % 2], "gold": i % 2} for i in range(9)],
        SCHEMA: [{"context_options": [f"a{i}b", f"cc{i}"], "continuation": " then z", "gold": i % 2} for i in range(9)],
        LANGUAGE_MODELING: [{"context": f"count {i}", "continuation": "x" * (1 + i % 3)} for i in range(9)],
    }
    for kind, examples in tasks.items():
        t = task(kind, shots=2, delimiter=" ")
        batched = core_eval.evaluate_task(tiny_model, CharTokenizer(), t, examples, max_len=40, token_budget=8 * 40)
        single = core_eval.evaluate_task(tiny_model, CharTokenizer(), t, examples, max_len=40, token_budget=1)
        assert single.forwards == single.sequences and batched.forwards < batched.sequences / 3, kind
        assert [(r["correct"], r["predicted"]) for r in batched.records] == [(r["correct"], r["predicted"]) for r in single.records]
        for b, s in zip(batched.records, single.records):
            if "losses" in b:
                assert b["losses"] == pytest.approx(s["losses"], abs=1e-4)
