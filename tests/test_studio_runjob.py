"""`manage.py runjob`: the headless pipeline, in process (fake stages) and end to end (real stages)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from studio.models import Run
from tests.conftest import REPO

pytestmark = pytest.mark.django_db


def runjob(*args):
    out, err = StringIO(), StringIO()
    try:
        call_command("runjob", *args, stdout=out, stderr=err)
        code = 0
    except CommandError as e:
        code = e.returncode
        err.write(str(e))
    return code, out.getvalue(), err.getvalue()


def test_runjob_runs_the_stages_and_prints_progress(runs_dir, fake_stages):
    code, out, err = runjob("tiny", "--name", "smoke")
    run = Run.objects.get()
    assert code == 0, err
    assert run.status == "done" and run.name == "smoke"
    assert f"run {run.id} (tiny) in {runs_dir / run.id}" in out
    assert "[tok_train] started (pid" in out and "[tok_eval] done in" in out
    assert "[tok_train] step=0 loss=3" in out  # a metric line
    assert "[tok_eval] eval: name=fake score=0.5" in out
    assert "status   done" in out and "tok_train    done" in out


def test_runjob_quiet_prints_only_the_summary(runs_dir, fake_stages):
    code, out, _ = runjob("tiny", "--quiet")
    assert code == 0
    assert "[tok_train]" not in out and "status   done" in out


def test_runjob_overrides_and_runs_dir(tmp_path, runs_dir, fake_stages):
    other = tmp_path / "elsewhere"
    code, _, err = runjob("tiny", "--set", "vocab_size=2048", "--set", "stages=tok_train", "--runs-dir", str(other))
    assert code == 0, err
    run = Run.objects.get()
    assert run.run_dir == other / run.id
    assert json.loads((run.run_dir / "config.json").read_text())["vocab_size"] == 2048
    assert list(run.stages.values_list("name", flat=True)) == ["tok_train"]


def test_runjob_invalid_config_explains_every_field_and_exits_2(runs_dir):
    code, out, err = runjob("tiny", "--set", "depth=0", "--set", "max_seq_len=100", "--set", "deepth=3")
    assert code == 2
    assert "depth: must be at least 1, got 0" in err
    assert "max_seq_len: must be a power of two (e.g. 64), got 100" in err
    assert "deepth: unknown setting" in err
    assert "Transformer layers" in err  # the field's help
    assert Run.objects.count() == 0 and list(runs_dir.iterdir()) == []


def test_runjob_unknown_preset_lists_presets(runs_dir):
    code, _, err = runjob("huge")
    assert code == 2
    assert "Unknown preset 'huge'" in err
    for preset in ("tiny", "speedrun", "d26", "d32"):
        assert f"  {preset}" in err


def test_runjob_failed_run_exits_1_with_the_log_tail(runs_dir, fake_stages):
    fake_stages["tok_eval"] = "fail"
    code, out, err = runjob("tiny")
    assert code == 1
    assert "[tok_eval] failed after" in out and "status   failed" in out
    assert "stage tok_eval failed (exit code 3): fake failure" in err and "log line 29" in err


def test_runjob_sigterm_stops_the_stage_and_marks_cancelled(runs_dir, fake_stages):
    fake_stages["tok_train"] = "sigterm-parent"  # the stage sends SIGTERM to runjob itself
    code, out, _ = runjob("tiny", "--set", "stages=tok_train,tok_eval")
    run = Run.objects.get()
    assert code == 130
    assert run.status == "cancelled"
    assert list(run.stages.values_list("status", flat=True)) == ["cancelled", "cancelled"]
    assert "status   cancelled" in out


def test_runjob_exit_status_from_the_shell(manage_env):
    result = subprocess.run(
        [sys.executable, "manage.py", "runjob", "tiny", "--set", "total_batch_size=1000"],
        cwd=REPO, env=manage_env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "total_batch_size: 1000 tokens is not a multiple of" in result.stderr


@pytest.mark.slow
def test_runjob_tiny_end_to_end(manage_env):
    """The quick-start command on a fresh database: the real stages on the offline mirror."""
    from tests.helpers import mirror

    manage_env["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    result = subprocess.run(
        # The tiny preset's stages, with pretraining cut to 30 steps to keep CI quick.
        [sys.executable, "manage.py", "runjob", "tiny", "--set", "num_iterations=30", "--set", "eval_every=15",
         "--set", "save_every=15", "--set", "sample_every=30", "--set", "eval_tokens=16384"],
        cwd=REPO, env=manage_env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [p for p in (os.path.join(manage_env["NANOSTUDIO_RUNS_DIR"], d) for d in os.listdir(manage_env["NANOSTUDIO_RUNS_DIR"])) if os.path.isdir(p)]
    assert len(runs) == 1
    run_dir = runs[0]
    for name in ("config.json", "events.jsonl", "tokenizer/tokenizer.json", "logs/tok_train.log", "logs/tok_eval.log",
                 "logs/base_train.log", "checkpoints/base_train/step_000030/model.safetensors", "logs/base_eval.log",
                 "evals/base_eval/arc_easy.jsonl"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert "[tok_train] done in" in result.stdout and "[tok_eval] done in" in result.stdout
    assert "[base_eval] done in" in result.stdout

    db = sqlite3.connect(manage_env["DATABASE_URL"].removeprefix("sqlite:///"))
    (status,) = db.execute("SELECT status FROM studio_run").fetchone()
    stages = db.execute("SELECT name, status, exit_code FROM studio_stagerun ORDER BY \"order\"").fetchall()
    kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM studio_runevent")}
    assert status == "done"
    assert stages == [("tok_train", "done", 0), ("tok_eval", "done", 0), ("base_train", "done", 0), ("base_eval", "done", 0)]
    assert {"stage_start", "stage_end", "eval", "metric", "sample", "checkpoint"} <= kinds


def test_runjob_gpus_sets_the_processes_per_node(runs_dir, fake_stages):
    code, _, err = runjob("tiny", "--gpus", "2", "--set", "total_batch_size=4096", "--set", "stages=tok_train")
    assert code == 0, err
    assert Run.objects.get().config["nproc_per_node"] == 2
    code, _, err = runjob("tiny", "--gpus", "0")
    assert code == 2 and "--gpus must be at least 1" in err


def test_runjob_resume_continues_a_failed_run_from_its_failed_stage(runs_dir, fake_stages):
    fake_stages["tok_eval"] = "fail"
    code, _, _ = runjob("tiny", "--set", "stages=tok_train,tok_eval")
    run = Run.objects.get()
    assert code == 1 and run.status == "failed"
    fake_stages["tok_eval"] = "ok"
    code, out, err = runjob("--resume", run.id)
    assert code == 0, err
    run.refresh_from_db()
    assert run.status == "done" and "[tok_train] started" not in out and "[tok_eval] done in" in out
    code, _, err = runjob("--resume", run.id)
    assert code == 2 and "only a paused, failed or cancelled run can be resumed" in err
    code, _, err = runjob("--resume", "no-such-run")
    assert code == 2 and "no run 'no-such-run'" in err


def test_runjob_resume_with_gpus_moves_the_run(runs_dir, fake_stages):
    fake_stages["tok_eval"] = "fail"
    code, _, _ = runjob("tiny", "--gpus", "2", "--set", "total_batch_size=4096", "--set", "stages=tok_train,tok_eval")
    run = Run.objects.get()
    assert code == 1 and run.config["nproc_per_node"] == 2
    fake_stages["tok_eval"] = "ok"
    code, _, err = runjob("--resume", run.id, "--gpus", "3")
    assert code == 2 and "can resume on 1, 2 GPU(s)" in err
    run.refresh_from_db()
    assert run.status == "failed" and run.config["nproc_per_node"] == 2  # refused: nothing changed
    code, _, err = runjob("--resume", run.id, "--gpus", "1")
    assert code == 0, err
    run.refresh_from_db()
    assert run.status == "done" and run.config["nproc_per_node"] == 1


def test_runjob_needs_a_preset_or_resume(runs_dir):
    code, _, err = runjob()
    assert code == 2 and "give a preset" in err


def test_runjob_user_records_the_owner(runs_dir, fake_stages, user):
    code, _, err = runjob("tiny", "--set", "stages=tok_train", "--user", "ada")
    assert code == 0, err
    assert Run.objects.get().owner == user
    code, _, err = runjob("tiny", "--user", "nobody")
    assert code == 2 and "no studio user 'nobody'" in err
