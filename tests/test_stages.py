"""The stage registry (pipeline/stages.py) and the stage commands cannot drift apart."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from pipeline import config, stages

REPO = Path(__file__).resolve().parents[1]
# Commands in trainer/ that are not pipeline stages (they read a run, they do not make one).
NOT_STAGES = {"chat_cli"}


def _parsed(stage: stages.Stage, argv: list[str]) -> dict:
    module = importlib.import_module(stage.module)
    return vars(module.parse_args(["--run-dir", "runs/drift", *argv]))


@pytest.mark.parametrize("stage", [s for s in stages.STAGES if s.available], ids=lambda s: s.name)
def test_every_flag_a_stage_is_given_exists_in_its_parser_with_the_schemas_default(stage):
    """The default configuration's command line parses to what the stage does with no flags at all.

    A flag the parser lacks fails to parse; a parser default that differs from the schema's
    default (the studio would then run something else than a hand-typed command) shows as a
    difference. Each value is also checked on its own, so the error names the flag.
    """
    defaults = config.defaults()
    given = _parsed(stage, stage.stage_args(defaults))
    bare = _parsed(stage, list(stage.args))
    for field, flag in stage.flags:
        dest = flag.lstrip("-").replace("-", "_")
        assert dest in bare, f"{stage.module} has no {flag} (the registry gives it {field})"
        if defaults[field] == "":
            assert bare[dest] in ("", None), f"{flag}: empty in the schema means 'not given', the stage defaults to {bare[dest]!r}"
        else:
            assert bare[dest] == defaults[field], (
                f"{stage.module} {flag} defaults to {bare[dest]!r}, the schema's {field} to {defaults[field]!r}")
    assert given == bare


@pytest.mark.parametrize("stage", [s for s in stages.STAGES if s.available], ids=lambda s: s.name)
def test_a_stage_takes_every_value_the_schema_allows_for_its_fields(stage):
    """Non-default values go through too: the flag is spelled as the parser wants and the type matches."""
    cfg = config.resolve("smoke", {"data_dir": str(REPO)})  # any existing absolute folder
    parsed = _parsed(stage, stage.stage_args(cfg))
    for field, flag in stage.flags:
        assert parsed[flag.lstrip("-").replace("-", "_")] == cfg[field], flag


def test_registry_entries_name_known_fields_once_and_their_modules_follow_the_layout():
    for stage in stages.STAGES:
        fields = [f for f, _ in stage.flags]
        flags = [flag for _, flag in stage.flags]
        assert set(fields) <= set(config.FIELD_BY_NAME), stage.name
        assert len(set(fields)) == len(fields) and len(set(flags)) == len(flags), stage.name
        assert all(flag.startswith("--") for flag in flags)
        assert stage.module.split(".")[0] in ("trainer", "evals"), "stage commands live in trainer/ or evals/"
        assert stage.timing in ("tokenizer", "tokenizer_eval", "pretrain", "scaled")
        if stage.timing == "scaled":
            assert stage.reference_seconds > 0 and stage.timing_basis, stage.name
        if stage.share_field:
            assert stage.share_field in config.FIELD_BY_NAME and stage.reference_items > 0, stage.name
        if stage.makes_model:
            assert stage.chat_mode in ("chat", "completion"), stage.name
        else:
            assert stage.chat_mode is None, stage.name
    columns = [c for _, c in stages.summary_columns()]
    assert len(set(columns)) == len(columns)
    assert stages.ORDER == list(stages.BY_NAME)


def test_every_module_in_trainer_is_a_registered_stage():
    """trainer/ holds stage commands only: a module there is either in the registry or a reader of runs."""
    registered = {s.module for s in stages.STAGES}
    for path in (REPO / "trainer").glob("*.py"):
        if path.stem in ("__init__",) or path.stem in NOT_STAGES:
            continue
        assert f"trainer.{path.stem}" in registered, f"trainer/{path.name} is not in pipeline/stages.py"


def test_every_schema_field_reaches_a_stage_or_the_launcher():
    """A field no stage takes and the launcher does not read would be a knob that does nothing."""
    launcher = {"nproc_per_node", "nnodes", "rdzv_endpoint", "stages"}
    used = {f for s in stages.STAGES for f, _ in s.flags}
    orphans = [f.name for f in config.FIELDS if f.name not in used | launcher]
    assert not orphans, f"fields no stage takes: {orphans}"


def test_unknown_stage_names_the_known_ones():
    with pytest.raises(KeyError, match="base_train"):
        stages.get("base_trian")


def test_model_stages_are_the_training_stages_most_advanced_first():
    assert stages.model_stages() == ["rl_train", "sft_train", "mid_train", "base_train"]
    assert stages.summary_columns() == [("base_eval", "BASE"), ("mid_eval", "MID"), ("sft_eval", "SFT"), ("rl_eval", "RL")]


def test_every_stage_answers_help(capsys):
    for stage in (s for s in stages.STAGES if s.available):
        module = importlib.import_module(stage.module)
        with pytest.raises(SystemExit) as exit_:
            module.parse_args(["--help"])
        assert exit_.value.code == 0
        assert "--run-dir" in capsys.readouterr().out, stage.name
