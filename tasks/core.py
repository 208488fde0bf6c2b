"""CORE: the 22 few-shot tasks a base model is scored on, their examples, and the CORE score.

The task set is DCLM's "low variance" set, scored as the reference project's base
evaluation does (README "What runs today"): each task has a type (multiple choice,
schema, language modelling; evals/core.py renders and scores them), a number of
few-shot examples, a continuation delimiter and a random-guessing baseline in percent.

    from tasks import core
    core.TASKS[0].label                       # "hellaswag_zeroshot"
    examples = core.load(core.get("arc_easy"))                 # every example, file order
    picked = core.select(examples, max_per_task=500)           # shuffled with Random(1337), cropped
    core.centered(0.40, core.get("arc_easy").baseline)         # 0.2 = (0.40 - 0.25) / (1 - 0.25)
    core.core_score({"arc_easy": 0.2, ...})                    # (mean centred accuracy, "CORE (1/22)")

Example formats (one JSON object per line, llm-foundry's ICL files):
    multiple_choice    {query, choices, gold}          one context, several continuations
    schema             {context_options, continuation, gold}   several contexts, one continuation
    language_modeling  {context, continuation}         greedy decoding must reproduce the continuation

Where the files come from: `pipeline.dataset.open_text` by their path in the mirror layout
(`core/eval_data/<category>/<file>.jsonl`, gzipped in the mirror): the mirror
(NANOSTUDIO_DATA_MIRROR), then the cache. Without a mirror a file in neither is downloaded
from llm-foundry on GitHub (at the commit the mirror's copies come from); with a mirror, the
mirror stands in for upstream (as it does for the pretraining shards) and nothing is
downloaded. A task whose file is nowhere is reported missing, not fatal: the offline mirror
lacks hellaswag (both), squad and coqa, so CORE there is "CORE (18/22)".

The table below is the project's own copy of the task facts (shots, type and delimiter from
DCLM's eval/heavy.yaml, baselines from DCLM's eval_meta_data_v1.csv: the version whose
baselines reproduce the reference's centred scores), so the task list never depends on a mirror.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from pipeline import dataset

MULTIPLE_CHOICE = "multiple_choice"
SCHEMA = "schema"
LANGUAGE_MODELING = "language_modeling"
KINDS = (MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING)

# Examples are shuffled with Random(SHUFFLE_SEED) before --max-per-task keeps the first ones;
# the few-shot examples of example i are drawn with Random(FEWSHOT_SEED + i).
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234

# llm-foundry's ICL files, at the commit the offline mirror's copies were taken from.
UPSTREAM = "https://raw.githubusercontent.com/mosaicml/llm-foundry/8c8dd48f72168c5d51e2f7b151595892a8fba43d/scripts/eval/"


@dataclass(frozen=True)
class CoreTask:
    label: str
    kind: str  # one of KINDS
    shots: int  # few-shot examples before the item
    delimiter: str  # between a context and its continuation
    baseline: float  # accuracy of random guessing, in percent
    uri: str  # llm-foundry's dataset_uri: local_data/<category>/<file>.jsonl

    @property
    def path(self) -> str:
        """The file's path in the mirror layout (shared/data)."""
        return "core/eval_data/" + self.uri.removeprefix("local_data/")

    @property
    def url(self) -> str:
        return UPSTREAM + self.uri


_NL = "\nAnswer: "
# label, type, shots, continuation delimiter, random baseline (percent, v1), llm-foundry dataset_uri
TASKS: tuple[CoreTask, ...] = tuple(CoreTask(*row) for row in (
    ("hellaswag_zeroshot", MULTIPLE_CHOICE, 0, " ", 25.0, "local_data/language_understanding/hellaswag.jsonl"),
    ("jeopardy", LANGUAGE_MODELING, 10, _NL, 0.0, "local_data/world_knowledge/jeopardy_all.jsonl"),
    ("bigbench_qa_wikidata", LANGUAGE_MODELING, 10, " ", 0.0, "local_data/world_knowledge/bigbench_qa_wikidata.jsonl"),
    ("arc_easy", MULTIPLE_CHOICE, 10, _NL, 25.0, "local_data/world_knowledge/arc_easy.jsonl"),
    ("arc_challenge", MULTIPLE_CHOICE, 10, _NL, 25.0, "local_data/world_knowledge/arc_challenge.jsonl"),
    ("copa", MULTIPLE_CHOICE, 0, " ", 50.0, "local_data/commonsense_reasoning/copa.jsonl"),
    ("commonsense_qa", MULTIPLE_CHOICE, 10, " ", 20.0, "local_data/commonsense_reasoning/commonsense_qa.jsonl"),
    ("piqa", MULTIPLE_CHOICE, 10, _NL, 50.0, "local_data/commonsense_reasoning/piqa.jsonl"),
    ("openbook_qa", MULTIPLE_CHOICE, 0, " ", 25.0, "local_data/commonsense_reasoning/openbook_qa.jsonl"),
    ("lambada_openai", LANGUAGE_MODELING, 0, " ", 0.0, "local_data/language_understanding/lambada_openai.jsonl"),
    ("hellaswag", MULTIPLE_CHOICE, 10, " ", 25.0, "local_data/language_understanding/hellaswag.jsonl"),
    ("winograd", SCHEMA, 0, " ", 50.0, "local_data/language_understanding/winograd_wsc.jsonl"),
    ("winogrande", SCHEMA, 0, " ", 50.0, "local_data/language_understanding/winogrande.jsonl"),
    ("bigbench_dyck_languages", LANGUAGE_MODELING, 10, " ", 0.0, "local_data/symbolic_problem_solving/bigbench_dyck_languages.jsonl"),
    ("agi_eval_lsat_ar", MULTIPLE_CHOICE, 3, " ", 20.0, "local_data/symbolic_problem_solving/agi_eval_lsat_ar.jsonl"),
    ("bigbench_cs_algorithms", LANGUAGE_MODELING, 10, " ", 0.0, "local_data/symbolic_problem_solving/bigbench_cs_algorithms.jsonl"),
    ("bigbench_operators", LANGUAGE_MODELING, 10, " ", 0.0, "local_data/symbolic_problem_solving/bigbench_operators.jsonl"),
    ("bigbench_repeat_copy_logic", LANGUAGE_MODELING, 10, " ", 0.0, "local_data/symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl"),
    ("squad", LANGUAGE_MODELING, 10, " ", 0.0, "local_data/reading_comprehension/squad.jsonl"),
    ("coqa", LANGUAGE_MODELING, 0, " ", 0.0, "local_data/reading_comprehension/coqa.jsonl"),
    ("boolq", MULTIPLE_CHOICE, 10, _NL, 62.0, "local_data/reading_comprehension/boolq.jsonl"),
    ("bigbench_language_identification", MULTIPLE_CHOICE, 10, " ", 9.1, "local_data/language_understanding/bigbench_language_identification.jsonl"),
))
BY_LABEL = {t.label: t for t in TASKS}


class TaskMissing(LookupError):
    """A task's file is in neither the mirror nor the cache (and was not, or could not be, downloaded)."""


def get(label: str) -> CoreTask:
    """The task called `label`; KeyError names the known ones."""
    try:
        return BY_LABEL[label]
    except KeyError:
        raise KeyError(f"unknown CORE task {label!r}; known: {', '.join(BY_LABEL)}") from None


def _check(task: CoreTask, rows: list[dict]) -> list[dict]:
    need = {MULTIPLE_CHOICE: ("query", "choices", "gold"), SCHEMA: ("context_options", "continuation", "gold"),
            LANGUAGE_MODELING: ("context", "continuation")}[task.kind]
    for n, row in enumerate(rows, 1):
        absent = [k for k in need if k not in row]
        if absent:
            raise ValueError(f"{task.path} line {n}: a {task.kind} example needs {', '.join(need)}; it lacks {', '.join(absent)}")
    return rows


def load(task: CoreTask, download: bool | None = None) -> list[dict]:
    """Every example of `task`, in file order; TaskMissing when its file cannot be had.

    download: fetch a file that is in neither the mirror nor the cache; None (the default)
    downloads only when no mirror is set (NANOSTUDIO_DATA_MIRROR), see the module docstring.
    """
    if download is None:
        download = dataset.mirror_root() is None
    try:
        f = dataset.open_text(task.path, task.url if download else None)
    except dataset.DatasetError as e:
        if download:
            raise TaskMissing(f"{task.path} is not in the cache and could not be downloaded: {e}") from None
        raise TaskMissing(f"{task.path} is in neither the data mirror nor the cache "
                          f"(without a data mirror it is downloaded from {task.url})") from None
    with f:
        return _check(task, [json.loads(line) for line in f if line.strip()])


def select(examples: list, max_per_task: int = -1) -> list:
    """A copy shuffled with Random(1337) and cut to the first `max_per_task` (<= 0: all of them).

    The same seed for every task and size: a smaller crop is a prefix of a larger one.
    """
    out = list(examples)
    random.Random(SHUFFLE_SEED).shuffle(out)
    return out[:max_per_task] if max_per_task > 0 else out


def fewshot_indices(index: int, count: int, shots: int) -> list[int]:
    """Which of `count` examples serve as the few-shot examples of example `index` (never itself).

    Drawn with Random(1234 + index), so they do not depend on how examples are split over
    ranks. Fewer than `shots` when the task has fewer other examples (a small --max-per-task).
    """
    others = [i for i in range(count) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(others, min(shots, len(others)))


def centered(accuracy: float, baseline_pct: float) -> float:
    """Accuracy rescaled so random guessing scores 0 and a perfect score 1: (acc - b) / (1 - b), b = pct / 100."""
    b = 0.01 * baseline_pct
    return (accuracy - b) / (1.0 - b)


def core_label(tasks_run: int) -> str:
    """ "CORE" over all 22 tasks, else "CORE (18/22)": a partial CORE is not comparable to published ones."""
    return "CORE" if tasks_run == len(TASKS) else f"CORE ({tasks_run}/{len(TASKS)})"


def core_score(centered_by_task: dict[str, float]) -> tuple[float | None, str]:
    """(mean of the centred accuracies, its label); (None, label) when no task ran."""
    label = core_label(len(centered_by_task))
    if not centered_by_task:
        return None, label
    return sum(centered_by_task.values()) / len(centered_by_task), label
