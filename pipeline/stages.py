"""The one table of pipeline stages: everything the rest of the project knows about a stage.

Each stage is a command (`python -m <module>`, or torchrun for the distributed ones) that
reads and writes one run directory. The studio, `runjob`, the configuration, the estimate,
the report card, the chat and checkpoint discovery all read the facts below; none keeps a
list of its own. Adding a stage is one entry here plus its module (README: "Adding a stage").

    from pipeline import stages
    stages.ORDER                          # names in pipeline order
    stages.get("base_train").resumable    # True
    stages.model_stages()                 # stages whose checkpoints a chat can load, most advanced first

Torch-free, like the rest of `pipeline/`: the studio imports it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # stored in run folders, events and the database: never rename one
    module: str  # `python -m <module>` runs it
    title: str  # its section of the report card
    distributed: bool = False  # one process per GPU under torchrun (else one process)
    resumable: bool = False  # saves checkpoints and takes --resume (pause, resume after a failure)
    makes_model: bool = False  # its checkpoints hold a model that chat can load
    chat_mode: str | None = None  # "chat" or "completion": how the chat page talks to its model
    report_column: str | None = None  # the column of the report card's summary table its metrics fill
    # How pipeline/estimate.py times it: "tokenizer" (characters read), "tokenizer_eval" (fixed),
    # "pretrain" (the model's FLOPs over the run's tokens) or "scaled" (reference_seconds of a d20
    # model on 8xH100, scaled by FLOPs per token and the hardware's throughput).
    timing: str = "scaled"
    reference_seconds: float = 0.0
    timing_basis: str = ""
    # "scaled" stages that can run a part of their reference work: the setting that caps items per
    # task (-1 = all), the number of tasks, and the items the reference_seconds cover.
    share_field: str | None = None
    share_tasks: int = 1
    reference_items: int = 0
    # (config field, command-line flag): the run configuration this stage is given. A field whose
    # value is empty text is left out (the stage's own default applies).
    flags: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()  # fixed arguments, for stages that share a module

    @property
    def available(self) -> bool:
        """True when the stage's module exists in this checkout (the others show as "coming")."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:  # its package is missing too
            return False

    def stage_args(self, cfg: dict) -> list[str]:
        """This stage's own arguments for a resolved configuration (after --run-dir)."""
        out = list(self.args)
        for field, flag in self.flags:
            value = cfg[field]
            if value == "":
                continue
            out.append(f"{flag}={value}")
        return out


_DATA = (("data_source", "--data-source"), ("data_dir", "--data-dir"))
_CHAT_EVAL = "chat evals: ARC, MMLU, GSM8K with tools, HumanEval (generation-bound)"

# Pipeline order. Reference seconds of the later stages: the reference's d20 speedrun on 8xH100
# (midtraining ~765 steps x 524,288 tokens; SFT ~650 steps; RL 467 steps x 256 sampled completions;
# an 8xA800 reproduction took 15 min of midtraining and 13 of SFT).
STAGES: tuple[Stage, ...] = (
    Stage("tok_train", "trainer.tok_train", "Tokenizer training", timing="tokenizer",
          flags=(("vocab_size", "--vocab-size"), ("tok_max_chars", "--max-chars"), ("tok_doc_cap", "--doc-cap"), *_DATA)),
    Stage("tok_eval", "trainer.tok_eval", "Tokenizer evaluation", timing="tokenizer_eval", flags=_DATA),
    Stage("base_train", "trainer.base_train", "Base model training", distributed=True, resumable=True,
          makes_model=True, chat_mode="completion", timing="pretrain",
          flags=(("depth", "--depth"), ("max_seq_len", "--max-seq-len"), ("device_batch_size", "--device-batch-size"),
                 ("total_batch_size", "--total-batch-size"), ("target_param_data_ratio", "--target-param-data-ratio"),
                 ("num_iterations", "--num-iterations"), ("eval_every", "--eval-every"), ("eval_tokens", "--eval-tokens"),
                 ("sample_every", "--sample-every"), ("save_every", "--save-every"), ("data_source", "--data-source"),
                 ("data_shards", "--num-shards"), ("data_dir", "--data-dir"))),
    Stage("base_eval", "evals.base_eval", "Base model evaluation", distributed=True, report_column="BASE",
          reference_seconds=300.0, timing_basis="CORE (22 few-shot tasks, ~1e8 forward tokens) + bits-per-byte",
          share_field="core_max_per_task", share_tasks=22, reference_items=91_037,  # the 22 tasks' examples
          flags=(("core_max_per_task", "--max-per-task"), ("eval_tokens", "--eval-tokens"),
                 ("device_batch_size", "--device-batch-size"), *_DATA)),
    Stage("mid_train", "trainer.mid_train", "Midtraining", distributed=True, resumable=True, makes_model=True,
          chat_mode="chat", reference_seconds=480.0,
          timing_basis="one epoch of the ~568K-conversation mixture (~4e8 tokens)"),
    Stage("mid_eval", "evals.chat_eval", "Midtraining evaluation", distributed=True, report_column="MID",
          reference_seconds=480.0, timing_basis=_CHAT_EVAL, args=("--source=mid_train",)),
    Stage("sft_train", "trainer.sft_train", "Supervised fine-tuning", distributed=True, resumable=True,
          makes_model=True, chat_mode="chat", reference_seconds=480.0,
          timing_basis="~650 steps of padded conversations, with periodic evals"),
    Stage("sft_eval", "evals.chat_eval", "SFT evaluation", distributed=True, report_column="SFT",
          reference_seconds=480.0, timing_basis=_CHAT_EVAL, args=("--source=sft_train",)),
    Stage("rl_train", "trainer.rl_train", "Reinforcement learning", distributed=True, resumable=True,
          makes_model=True, chat_mode="chat", reference_seconds=3600.0,
          timing_basis="GRPO on GSM8K: 467 steps of 256 sampled completions (generation-bound)"),
    Stage("rl_eval", "evals.chat_eval", "RL evaluation", distributed=True, report_column="RL",
          reference_seconds=300.0, timing_basis="GSM8K pass@k", args=("--source=rl_train",)),
)
BY_NAME = {s.name: s for s in STAGES}
ORDER = [s.name for s in STAGES]


def get(name: str) -> Stage:
    """The stage called `name`; KeyError names the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(ORDER)}") from None


def available() -> list[str]:
    """Names of the stages this checkout can run, in pipeline order."""
    return [s.name for s in STAGES if s.available]


def model_stages() -> list[str]:
    """Stages whose checkpoints hold a model, most advanced first: what a chat loads by default."""
    return [s.name for s in reversed(STAGES) if s.makes_model]


def summary_columns() -> list[tuple[str, str]]:
    """(stage, column) of the report card's summary table, in pipeline order."""
    return [(s.name, s.report_column) for s in STAGES if s.report_column]
