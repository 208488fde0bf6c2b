"""ChatCORE: one number for the chat evaluations.

Each task's accuracy is centred on its chance level, (acc - baseline) /
(1 - baseline), so 0 is guessing and 1 is perfect (baselines: chance for the
four-choice tasks, 0 for the generative ones); ChatCORE is the mean of the
centred scores, and exists only when every task ran: a partial mean would not
be comparable to published numbers (tasks/core.py labels a partial CORE alike).

    chatcore({"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854})
    # -> (0.0884..., 'ChatCORE')
    chatcore({"MMLU": 0.32})                          # -> (None, 'ChatCORE (1/5: MMLU)')
    chatcore(results, CATEGORICAL, "ChatCORE_cat")    # the three letter-scored tasks only

Task names may be given in any case and punctuation ("arc_easy", "arceasy"), or as the
report card's short names "arce"/"arcc".
"""

from __future__ import annotations

import re

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
TASKS = tuple(BASELINES)
CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): name for name in TASKS} | {"arce": "ARC-Easy", "arcc": "ARC-Challenge"}


def task_name(name: str) -> str:
    """The canonical name of a task ('arc_easy' -> 'ARC-Easy'); KeyError for an unknown one."""
    try:
        return _BY_KEY[_key(name)]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def centered(acc: float, baseline: float) -> float:
    return (acc - baseline) / (1.0 - baseline)


def chatcore(results: dict, tasks=TASKS, name: str = "ChatCORE") -> tuple[float | None, str]:
    """(mean centred score over `tasks`, label); (None, label of what ran) unless every task has a result.

    Other names in `results` (CORE, a task of your own) are ignored.
    """
    accs = {_BY_KEY[_key(k)]: v for k, v in results.items() if _key(k) in _BY_KEY and v is not None}
    ran = [t for t in tasks if t in accs]
    if len(ran) < len(tasks):
        return None, f"{name} ({len(ran)}/{len(tasks)}{': ' + ', '.join(ran) if ran else ''})"
    return sum(centered(accs[t], BASELINES[t]) for t in tasks) / len(tasks), name
