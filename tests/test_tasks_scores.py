"""ChatCORE: centred accuracies, and a score only when every task ran."""

import pytest

from tasks import scores


def test_centering_puts_chance_at_zero_and_perfect_at_one():
    assert scores.centered(0.25, 0.25) == 0.0 and scores.centered(1.0, 0.25) == 1.0
    assert scores.centered(0.1, 0.25) == pytest.approx(-0.2)
    assert scores.centered(0.3, 0.0) == 0.3


def test_chatcore_reproduces_the_reference_sft_row():
    # The reference's v0 d20 SFT numbers and its reported ChatCORE 0.0884.
    results = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854}
    score, label = scores.chatcore(results)
    assert score == pytest.approx(0.0884, abs=5e-5) and label == "ChatCORE"


def test_chatcore_needs_every_task_and_says_what_ran():
    assert scores.chatcore({"mmlu": 0.3, "arc_easy": 0.4, "CORE": 0.2}) == (None, "ChatCORE (2/5: ARC-Easy, MMLU)")
    assert scores.chatcore({}) == (None, "ChatCORE (0/5)")
    assert scores.chatcore({t: 0.5 for t in scores.TASKS} | {"GSM8K": None})[0] is None
    cat, label = scores.chatcore({"arce": 0.25, "arcc": 0.25, "MMLU": 1.0}, scores.CATEGORICAL, "ChatCORE_cat")
    assert cat == pytest.approx(1 / 3) and label == "ChatCORE_cat"


def test_task_names_are_canonical():
    assert scores.task_name("arc-challenge") == "ARC-Challenge" and scores.task_name("HUMANEVAL") == "HumanEval"
    with pytest.raises(KeyError, match="known: ARC-Easy"):
        scores.task_name("SpellingBee")
