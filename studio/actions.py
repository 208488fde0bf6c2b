"""Everything that changes a run's state. Views, tasks and `runjob` call these.

    run = create_run("tiny", {"vocab_size": "4096"})   # validate, make runs/<id>/, write config.json
    enqueue_run(run)                                   # the django-q2 worker calls execute_run
    execute_run(run, on_event=print)                   # or run it here, in the foreground
    cancel_run(run)                                    # from any process: a DB flag the supervisor polls

How a run executes: each stage is a subprocess started in its own session, so
its pid is also the id of a process group that holds every process the stage
starts (torchrun's ranks, data loader workers, compiler workers). Stopping a
stage means signalling that group: SIGTERM, a grace period, then SIGKILL.
The supervisor (the queue worker or `runjob`) follows events.jsonl while the
stage runs, stores new events as RunEvent rows and polls the run's
cancel_requested flag, which is how a click in the browser reaches a worker
in another process.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from studio.models import Run, RunEvent, StageRun, new_run_id, tail_lines
from trainer import config
from trainer.events import CONFIG_FILE, read_events, stage_log_path, write_json_atomic

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a running stage's events and the cancel flag are checked
LOG_TAIL_LINES = 20  # lines of a failed stage's log quoted in the run's error


class RunNotQueued(Exception):
    """execute_run was asked to start a run that is not (or no longer) queued."""


# --- creating and queueing -------------------------------------------------------------------


def create_run(preset: str, overrides: dict | None = None, name: str = "", runs_dir: str | os.PathLike | None = None) -> Run:
    """Validate the configuration, create runs/<id>/ with config.json, and the Run row.

    Raises config.ConfigError (with per-field messages) and creates nothing
    if the configuration is invalid.
    """
    cfg = config.resolve(preset, overrides or {})
    run_id = new_run_id()
    run_dir = Path(runs_dir or settings.NANOSTUDIO_RUNS_DIR).resolve() / run_id
    (run_dir / "logs").mkdir(parents=True)
    try:
        write_json_atomic(run_dir / CONFIG_FILE, cfg)
        commands = config.stage_commands(cfg, str(run_dir))
        with transaction.atomic():
            run = Run.objects.create(id=run_id, name=name.strip(), preset=preset, config=cfg, directory=str(run_dir))
            StageRun.objects.bulk_create(
                StageRun(run=run, name=cmd.name, order=i, argv=cmd.argv) for i, cmd in enumerate(commands)
            )
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # it holds nothing but config.json yet
        raise
    log.info("created run %s (%s) in %s", run.id, preset, run_dir)
    return run


def enqueue_run(run: Run, sync: bool = False) -> str:
    """Hand the run to the django-q2 cluster (see Q_CLUSTER in settings for timeout/retry)."""
    from django_q.tasks import async_task

    return async_task(
        "studio.tasks.run_pipeline",
        run.id,
        task_name=f"run {run.id}",
        group="pipelines",
        timeout=settings.NANOSTUDIO_RUN_TIMEOUT,
        sync=sync,
    )


# --- executing -------------------------------------------------------------------------------


def execute_run(
    run: Run,
    on_event: Callable[[dict], None] | None = None,
    stop_check: Callable[[], bool] | None = None,
    on_stage: Callable[[StageRun], None] | None = None,
) -> Run:
    """Run the run's stages in order, in this process; return the finished run.

    on_event(event) is called for every new event a stage writes; on_stage(stage)
    whenever a stage starts or finishes; stop_check() -> True stops the run like
    cancel_run does. A failed stage fails the run and skips the rest.
    KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by `runjob`) kills
    the running stage, marks the run cancelled and is re-raised; any other
    exception (e.g. the queue's timeout) does the same but marks it failed.
    """
    # The one gate against running a pipeline twice (a re-delivered queue
    # task, two `runjob`s, a double click): only one UPDATE can win.
    claimed = Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED, cancel_requested=False).update(
        status=Run.Status.RUNNING,
        started_at=timezone.now(),
        supervisor_pid=os.getpid(),
        supervisor_host=socket.gethostname(),
    )
    run.refresh_from_db()
    if not claimed:
        raise RunNotQueued(f"run {run.id} is {run.status}; only a queued run can be executed")

    commands = {cmd.name: cmd for cmd in config.stage_commands(run.config, str(run.run_dir))}
    outcome, error = Run.Status.DONE, ""
    try:
        for stage in run.stages.order_by("order"):
            if _stop_requested(run, stop_check):
                outcome, error = Run.Status.CANCELLED, "cancelled"
                break
            status = _run_stage(run, stage, commands.get(stage.name), on_event, on_stage, stop_check)
            if status == StageRun.Status.CANCELLED:
                outcome, error = Run.Status.CANCELLED, f"cancelled during {stage.name}"
                break
            if status == StageRun.Status.FAILED:
                outcome, error = Run.Status.FAILED, _failure_message(run, stage)
                break
    except KeyboardInterrupt:
        outcome, error = Run.Status.CANCELLED, "interrupted (Ctrl-C or SIGTERM to the supervisor)"
        raise
    except BaseException as e:
        outcome, error = Run.Status.FAILED, f"supervisor stopped: {type(e).__name__}: {e}"
        raise
    finally:
        _finish_run(run, outcome, error)
    return run


def _run_stage(run, stage, command, on_event, on_stage, stop_check) -> str:
    """Run one stage to its end; return its final status."""
    log_path = stage_log_path(run.run_dir, stage.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stage.started_at = timezone.now()
    if command is None:
        return _finish_stage(stage, StageRun.Status.FAILED, None, on_stage, note=f"no command for stage {stage.name}")
    stage.argv = command.argv
    env = {**os.environ, **command.env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab", buffering=0) as log_file:
        log_file.write(f"# {timezone.now():%Y-%m-%d %H:%M:%S} UTC nanostudio runs: {stage.command_line}\n".encode())
        try:
            proc = subprocess.Popen(
                command.argv,
                cwd=settings.BASE_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: one signal reaches every process of the stage
            )
        except OSError as e:
            log_file.write(f"# could not start: {e}\n".encode())
            return _finish_stage(stage, StageRun.Status.FAILED, None, on_stage)

    stopped = False
    try:
        stage.pid, stage.status = proc.pid, StageRun.Status.RUNNING
        stage.save(update_fields=["argv", "pid", "status", "started_at"])
        if on_stage:
            on_stage(stage)
        while True:
            try:
                code = proc.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                code = None
            if _follow(run, on_event, stop_check) and code is None:
                stopped = True
                code = terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
            if code is not None:
                break
    except BaseException as e:
        code = terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
        status = StageRun.Status.CANCELLED if isinstance(e, KeyboardInterrupt) else StageRun.Status.FAILED
        _finish_stage(stage, status, code, on_stage)
        raise
    _kill_leftovers(proc.pid)
    stop_requested = _follow(run, on_event, stop_check)
    # A stage that ends badly just as the run is cancelled (it may have been
    # signalled from outside, e.g. by a person) counts as cancelled, not failed.
    if not stopped and code != 0 and stop_requested:
        stopped = True
    if stopped:
        status = StageRun.Status.CANCELLED
    else:
        status = StageRun.Status.DONE if code == 0 else StageRun.Status.FAILED
    return _finish_stage(stage, status, code, on_stage)


def _finish_stage(stage, status, code, on_stage, note: str = "") -> str:
    stage.status, stage.exit_code, stage.finished_at = status, code, timezone.now()
    stage.save(update_fields=["argv", "status", "exit_code", "started_at", "finished_at"])
    if note:
        with open(stage_log_path(stage.run.run_dir, stage.name), "a") as f:
            f.write(f"# {note}\n")
    if on_stage:
        on_stage(stage)
    return status


def _finish_run(run: Run, outcome: str, error: str) -> None:
    leftover = StageRun.Status.SKIPPED if outcome == Run.Status.FAILED else StageRun.Status.CANCELLED
    if outcome != Run.Status.DONE:
        run.stages.filter(status=StageRun.Status.QUEUED).update(status=leftover)
    try:
        ingest_events(run)
    except Exception:  # the run's outcome matters more than its last events
        log.exception("could not ingest the last events of run %s", run.id)
    Run.objects.filter(pk=run.pk).update(status=outcome, error=error, finished_at=timezone.now())
    run.refresh_from_db()
    log.info("run %s %s", run.id, outcome)


def _failure_message(run: Run, stage: StageRun) -> str:
    code = stage.exit_code
    how = f"exit code {code}" if code is None or code >= 0 else f"killed by {signal.Signals(-code).name}"
    message = f"stage {stage.name} failed ({how})"
    last_error = run.events.filter(stage=stage.name, kind="error").order_by("-seq").first()
    if last_error and last_error.data.get("message"):
        message += f": {last_error.data['message']}"
    tail = tail_lines(stage.log_path, LOG_TAIL_LINES)
    if tail:
        message += f"\n--- last {len(tail)} lines of logs/{stage.name}.log ---\n" + "\n".join(tail)
    return message


def _follow(run: Run, on_event, stop_check) -> bool:
    """Store the stage's new events; return True if the run should stop.

    A busy database (SQLite shared with the web process) must not kill a
    training run: the events stay in events.jsonl and are stored next time.
    """
    try:
        ingest_events(run, on_event)
        return _stop_requested(run, stop_check)
    except DatabaseError as e:
        log.warning("run %s: database unavailable, will retry: %s", run.id, e)
        return stop_check is not None and bool(stop_check())


def _stop_requested(run: Run, stop_check) -> bool:
    if stop_check is not None and stop_check():
        return True
    return Run.objects.filter(pk=run.pk, cancel_requested=True).exists()


# --- events ----------------------------------------------------------------------------------


def ingest_events(run: Run, on_event: Callable[[dict], None] | None = None) -> list[dict]:
    """Store events written since run.events_offset; return them (and pass each to on_event).

    Idempotent: rows are unique per (run, seq), so reading the same lines
    again (e.g. after a crash between insert and offset update) adds nothing.
    """
    events, offset = read_events(run.run_dir, run.events_offset)
    if events:
        RunEvent.objects.bulk_create(
            [
                RunEvent(
                    run_id=run.pk,
                    seq=e["seq"],
                    stage=str(e.get("stage", ""))[:64],
                    kind=str(e.get("kind", ""))[:32],
                    time=e["time"] if isinstance(e.get("time"), (int, float)) and math.isfinite(e["time"]) else None,
                    data=_json_safe(e),
                )
                for e in events
            ],
            ignore_conflicts=True,
            batch_size=500,
        )
    if offset != run.events_offset:
        Run.objects.filter(pk=run.pk).update(events_offset=offset)
        run.events_offset = offset
    if on_event:
        for event in events:
            on_event(event)
    return events


def _json_safe(value):
    # A loss that went NaN is worth keeping, but NaN is not JSON: SQLite's
    # JSON check would reject the row (and ignore_conflicts would drop it silently).
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --- stopping --------------------------------------------------------------------------------


def cancel_run(run: Run) -> Run:
    """Stop a run: a queued one is cancelled at once; a running one is asked to stop.

    For a running run this sets cancel_requested. Its supervisor (the queue
    worker or `runjob`, maybe in another process) polls the flag, sends
    SIGTERM to the running stage's process group, waits NANOSTUDIO_CANCEL_GRACE
    seconds, sends SIGKILL, and records the run as cancelled. Only the
    supervisor signals, so a stage that shuts down cleanly on SIGTERM (saving
    a checkpoint, say) is not hit by a second one mid-way. If the supervisor
    is gone, this sends the SIGTERM and records the outcome itself.
    """
    now = timezone.now()
    if Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED).update(
        status=Run.Status.CANCELLED, cancel_requested=True, finished_at=now, error="cancelled before it started"
    ):
        run.stages.filter(status=StageRun.Status.QUEUED).update(status=StageRun.Status.CANCELLED)
    elif Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(cancel_requested=True):
        run.refresh_from_db()
        if _supervisor_gone(run):
            for stage in run.stages.filter(status=StageRun.Status.RUNNING, pid__isnull=False):
                signal_process_group(stage.pid, signal.SIGTERM)
            _abandon(run, Run.Status.CANCELLED, "cancelled (its supervisor was no longer running)")
    run.refresh_from_db()
    return run


def _supervisor_gone(run: Run) -> bool:
    # Only answerable on the supervisor's own host (runs may share a database across nodes).
    return bool(run.supervisor_pid) and run.supervisor_host == socket.gethostname() and not pid_alive(run.supervisor_pid)


def reap_orphaned_runs() -> list[Run]:
    """Fail runs marked running on this host whose supervisor process is gone.

    A queue worker or `runjob` killed with SIGKILL (or a reboot) cannot record
    its run's end; call this before starting work so such runs do not stay
    "running" forever. Their stage process groups get SIGTERM.
    """
    reaped = []
    for run in Run.objects.filter(status=Run.Status.RUNNING, supervisor_host=socket.gethostname()):
        if _supervisor_gone(run):
            for stage in run.stages.filter(status=StageRun.Status.RUNNING, pid__isnull=False):
                signal_process_group(stage.pid, signal.SIGTERM)
            _abandon(run, Run.Status.FAILED, f"its supervisor (pid {run.supervisor_pid}) exited without finishing the run")
            reaped.append(run)
    return reaped


def _abandon(run: Run, outcome: str, error: str) -> None:
    stage_status = StageRun.Status.CANCELLED if outcome == Run.Status.CANCELLED else StageRun.Status.FAILED
    now = timezone.now()
    run.stages.filter(status=StageRun.Status.RUNNING).update(status=stage_status, finished_at=now)
    run.stages.filter(status=StageRun.Status.QUEUED).update(
        status=StageRun.Status.CANCELLED if outcome == Run.Status.CANCELLED else StageRun.Status.SKIPPED
    )
    Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(status=outcome, error=error, finished_at=now)


def terminate_process_group(proc: subprocess.Popen, grace: float) -> int:
    """SIGTERM the process group led by `proc`, SIGKILL it after `grace` seconds; return the exit code."""
    signal_process_group(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        signal_process_group(proc.pid, signal.SIGKILL)
        return proc.wait()
    finally:
        _kill_leftovers(proc.pid)


def _kill_leftovers(pgid: int, grace: float = 2.0) -> None:
    # Processes the stage started and left behind (they keep the group alive
    # after its leader exited): no stage may outlive its StageRun.
    if not group_alive(pgid):
        return
    signal_process_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not group_alive(pgid):
            return
    signal_process_group(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """True while a process group has a member that is not a zombie.

    Zombies count for killpg(pgid, 0), and orphaned ones may never be reaped
    in a container whose init does not wait() for them; /proc tells them apart.
    """
    if not signal_process_group(pgid, 0):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def signal_process_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but is not ours: leave it alone
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
