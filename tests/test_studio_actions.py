"""studio.actions: creating, executing, cancelling runs (fake stage subprocesses)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio import actions, ingest, tasks
from studio.models import Run, RunEvent, StageRun
from pipeline import config
from pipeline.events import EventWriter

TWO_STAGES = {"stages": "tok_train,tok_eval"}  # enough stages to see ordering, skipping and cancelling

pytestmark = pytest.mark.django_db


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return state[state.rfind(")") + 2] in "ZX"


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- create_run ------------------------------------------------------------------------------


def test_create_run_writes_config_and_plans_stages(runs_dir):
    run = actions.create_run("tiny", {"vocab_size": "2048"}, name=" first ")
    assert run.status == Run.Status.QUEUED and run.name == "first"
    assert run.run_dir == runs_dir / run.id
    on_disk = json.loads((run.run_dir / "config.json").read_text())
    assert on_disk == run.config and on_disk["vocab_size"] == 2048
    assert (run.run_dir / "logs").is_dir()
    assert [(s.name, s.status) for s in run.stages.all()] == [(name, "queued") for name in config.available_stages()]
    assert [s.name for s in run.stages.all()][:3] == ["tok_train", "tok_eval", "base_train"]
    argv = run.stages.first().argv
    assert argv[1:5] == ["-m", "trainer.tok_train", "--run-dir", str(run.run_dir)]


def test_create_run_rejects_bad_config_and_creates_nothing(runs_dir):
    with pytest.raises(config.ConfigError) as err:
        actions.create_run("tiny", {"depth": "0", "max_seq_len": "100"})
    assert set(err.value.errors) == {"depth", "max_seq_len"}
    assert Run.objects.count() == 0 and list(runs_dir.iterdir()) == []


def test_run_ids_are_unique_folder_names(runs_dir):
    ids = {actions.create_run("tiny").id for _ in range(5)}
    assert len(ids) == 5
    assert all(i.replace("-", "").isalnum() for i in ids)


# --- execute_run -----------------------------------------------------------------------------


def test_execute_run_runs_stages_and_ingests_events_once(runs_dir, fake_stages):
    run = actions.create_run("tiny", {"stages": "tok_train,tok_eval"})
    seen, stage_updates = [], []
    run = actions.execute_run(run, on_event=seen.append, on_stage=lambda s: stage_updates.append((s.name, s.status)))

    assert run.status == Run.Status.DONE and run.error == "" and run.finished_at >= run.started_at
    stages = list(run.stages.all())
    assert [(s.name, s.status, s.exit_code) for s in stages] == [("tok_train", "done", 0), ("tok_eval", "done", 0)]
    assert all(s.pid and s.duration is not None and s.duration >= 0 for s in stages)
    assert stage_updates == [("tok_train", "running"), ("tok_train", "done"), ("tok_eval", "running"), ("tok_eval", "done")]
    assert "fake stage in mode ok" in stages[0].log_path.read_text()

    # 2 stages x (stage_start, 3 metrics, eval, stage_end), each once, numbered by line.
    seqs = list(run.events.values_list("seq", flat=True))
    assert seqs == list(range(1, 13))
    assert sorted(e["seq"] for e in seen) == seqs
    assert run.events.filter(kind="metric", stage="tok_eval").count() == 3
    assert run.events_offset == (run.run_dir / "events.jsonl").stat().st_size

    # Reading the whole file again (a crash between insert and offset update) adds nothing.
    run.events_offset = run.events_seq = 0
    again = ingest.ingest_events(run)
    assert len(again) == 12 and RunEvent.objects.filter(run=run).count() == 12


def test_ingest_keeps_events_with_nan_values(runs_dir):
    run = actions.create_run("tiny")
    EventWriter(run.run_dir, "tok_train").metric(step=1, loss=float("nan"))
    ingest.ingest_events(run)
    assert run.events.get().data["loss"] == "nan"


def test_ingest_leaves_a_torn_last_line_for_later(runs_dir):
    run = actions.create_run("tiny")
    EventWriter(run.run_dir, "tok_train").metric(step=1)
    with open(run.run_dir / "events.jsonl", "a") as f:
        f.write('{"kind": "metric", "st')
    assert len(ingest.ingest_events(run)) == 1
    with open(run.run_dir / "events.jsonl", "a") as f:
        f.write('age": "tok_train", "step": 2}\n')
    assert [e["step"] for e in ingest.ingest_events(run)] == [2]
    assert list(run.events.values_list("seq", flat=True)) == [1, 2]


def test_a_busy_database_does_not_stop_a_stage(runs_dir, fake_stages, monkeypatch):
    from django.db import OperationalError

    real_ingest, calls = ingest.ingest_events, []

    def flaky_ingest(run, on_event=None):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("database is locked")
        return real_ingest(run, on_event)

    monkeypatch.setattr(ingest, "ingest_events", flaky_ingest)
    run = actions.execute_run(actions.create_run("tiny", TWO_STAGES))
    assert run.status == Run.Status.DONE
    assert run.events.count() == 12  # caught up on the next read


def test_failing_stage_fails_run_skips_rest_and_quotes_log(runs_dir, fake_stages):
    fake_stages["tok_train"] = "fail"
    run = actions.execute_run(actions.create_run("tiny", TWO_STAGES))

    assert run.status == Run.Status.FAILED
    train, evaluate = run.stages.all()
    assert (train.status, train.exit_code) == ("failed", 3)
    assert (evaluate.status, evaluate.pid) == ("skipped", None)
    assert "stage tok_train failed (exit code 3): fake failure" in run.error
    assert "log line 29" in run.error and "log line 10" in run.error
    assert "log line 9\n" not in run.error  # only the tail (last 20 lines)


def test_stage_that_cannot_start_fails_the_run(runs_dir, monkeypatch):
    monkeypatch.setattr(config, "stage_commands", lambda cfg, run_dir, python=None: [
        config.StageCommand(name, ["/nonexistent/python", "-m", "x"]) for name in cfg["stages"]
    ])
    run = actions.execute_run(actions.create_run("tiny"))
    assert run.status == Run.Status.FAILED
    assert run.stages.get(name="tok_train").status == "failed"
    assert "No such file" in run.stages.get(name="tok_train").log_path.read_text()


def test_a_run_cannot_be_executed_twice(runs_dir, fake_stages):
    run = actions.create_run("tiny")
    actions.execute_run(run)
    with pytest.raises(actions.RunNotQueued):
        actions.execute_run(Run.objects.get(pk=run.pk))


def test_a_running_run_is_not_started_again(runs_dir, fake_stages):
    run = actions.create_run("tiny")
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING)  # another worker claimed it
    with pytest.raises(actions.RunNotQueued):
        actions.execute_run(run)
    assert not run.stages.filter(pid__isnull=False).exists()
    assert not (run.run_dir / "events.jsonl").exists()


def test_redelivered_task_leaves_a_finished_run_alone(runs_dir, fake_stages):
    run = actions.create_run("tiny")
    assert tasks.run_pipeline(run.id) == "done"
    events = RunEvent.objects.count()
    assert tasks.run_pipeline(run.id) == "done"  # as if the broker delivered it again
    assert RunEvent.objects.count() == events


# --- cancellation ----------------------------------------------------------------------------


def test_cancel_kills_the_whole_process_group(runs_dir, fake_stages):
    fake_stages["tok_train"] = "hang"
    run = actions.create_run("tiny")
    pids = {}

    def on_event(event):
        # The stage is up and has started its own child: cancel as the web would.
        if event["kind"] == "metric" and not pids:
            stage = run.stages.get(name="tok_train")
            pids["stage"] = stage.pid
            pids["grandchild"] = int((run.run_dir / "tok_train.grandchild").read_text())
            actions.cancel_run(Run.objects.get(pk=run.pk))

    started = time.monotonic()
    run = actions.execute_run(run, on_event=on_event)
    assert time.monotonic() - started < 30
    assert run.status == Run.Status.CANCELLED
    assert {s.status for s in run.stages.all()} == {"cancelled"} and run.stages.count() == len(config.available_stages())
    assert process_gone(pids["stage"])
    assert wait_until(lambda: process_gone(pids["grandchild"]))


def test_cancel_escalates_to_sigkill_after_the_grace_period(runs_dir, fake_stages, settings):
    fake_stages["tok_train"] = "stubborn"  # ignores SIGTERM, and so does its child
    settings.NANOSTUDIO_CANCEL_GRACE = 0.5
    run = actions.create_run("tiny")
    grandchild = []

    def stop():
        path = run.run_dir / "tok_train.grandchild"
        if path.exists() and path.read_text():
            grandchild.append(int(path.read_text()))
            return True
        return False

    run = actions.execute_run(run, stop_check=stop)
    assert run.status == Run.Status.CANCELLED
    stage = run.stages.get(name="tok_train")
    assert stage.exit_code == -9
    assert wait_until(lambda: process_gone(grandchild[0]))


def test_keyboard_interrupt_kills_stage_and_marks_cancelled(runs_dir, fake_stages):
    fake_stages["tok_train"] = "hang"
    run = actions.create_run("tiny")

    def interrupt(event):
        if event["kind"] == "metric":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        actions.execute_run(run, on_event=interrupt)
    run.refresh_from_db()
    stage = run.stages.get(name="tok_train")
    assert run.status == Run.Status.CANCELLED and stage.status == StageRun.Status.CANCELLED
    assert process_gone(stage.pid)
    grandchild = int((run.run_dir / "tok_train.grandchild").read_text())
    assert wait_until(lambda: process_gone(grandchild))


def test_cancel_a_queued_run(runs_dir):
    run = actions.cancel_run(actions.create_run("tiny"))
    assert run.status == Run.Status.CANCELLED and run.finished_at
    assert set(run.stages.values_list("status", flat=True)) == {"cancelled"}
    with pytest.raises(actions.RunNotQueued):
        actions.execute_run(run)


def test_cancel_a_finished_run_changes_nothing(runs_dir, fake_stages):
    run = actions.execute_run(actions.create_run("tiny"))
    assert actions.cancel_run(run).status == Run.Status.DONE


def mark_running_with_dead_supervisor(run, stage_pid=None):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.RUNNING, supervisor_pid=dead.pid, supervisor_host=socket.gethostname()
    )
    run.stages.filter(name="tok_train").update(status=StageRun.Status.RUNNING, pid=stage_pid)
    return dead.pid


def test_cancel_without_a_supervisor_stops_the_stage_itself(runs_dir):
    run = actions.create_run("tiny", TWO_STAGES)
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    mark_running_with_dead_supervisor(run, stage_pid=orphan.pid)
    run = actions.cancel_run(run)
    assert orphan.wait(timeout=10) == -signal.SIGTERM
    assert run.status == Run.Status.CANCELLED and "supervisor" in run.error
    assert list(run.stages.values_list("status", flat=True)) == ["cancelled", "cancelled"]


def test_orphaned_running_run_is_reaped(runs_dir):
    run = actions.create_run("tiny", TWO_STAGES)
    dead = mark_running_with_dead_supervisor(run)
    assert [r.pk for r in actions.reap_orphaned_runs()] == [run.pk]
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and f"pid {dead}" in run.error
    assert list(run.stages.values_list("status", flat=True)) == ["failed", "skipped"]


# --- the queue -------------------------------------------------------------------------------


def test_enqueue_puts_one_task_on_the_orm_broker(runs_dir):
    from django_q.models import OrmQ

    run = actions.create_run("tiny")
    actions.enqueue_run(run)
    (queued,) = OrmQ.objects.all()
    assert queued.task["func"] == "studio.tasks.run_pipeline"
    assert queued.task["args"] == (run.id,)


def test_queued_task_runs_the_pipeline(runs_dir, fake_stages):
    from django_q.models import Task

    run = actions.create_run("tiny")
    actions.enqueue_run(run, sync=True)  # the worker code path, in this process
    run.refresh_from_db()
    assert run.status == Run.Status.DONE
    assert Task.objects.get().success


def test_worker_sigterm_kills_the_stage_and_fails_the_run(runs_dir, fake_stages):
    fake_stages["tok_train"] = "sigterm-parent"  # as if qcluster's guard or systemd stopped the worker
    run = actions.create_run("tiny")
    with pytest.raises(tasks.WorkerStopped):
        tasks.run_pipeline(run.id)
    run.refresh_from_db()
    stage = run.stages.get(name="tok_train")
    assert run.status == Run.Status.FAILED and "worker received SIGTERM" in run.error
    assert stage.status == StageRun.Status.FAILED and process_gone(stage.pid)
    assert run.stages.get(name="tok_eval").status == StageRun.Status.SKIPPED
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the worker's own handler is back


def test_queue_settings_never_redeliver_a_running_pipeline(settings):
    q = settings.Q_CLUSTER
    assert q["timeout"] == settings.NANOSTUDIO_RUN_TIMEOUT >= 3 * 24 * 3600
    assert q["retry"] > q["timeout"]
    assert q["max_attempts"] == 1
