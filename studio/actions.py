"""Everything that changes a run's state. Views, tasks and `runjob` call these.

    run = create_run("tiny", {"vocab_size": "4096"})   # validate, make runs/<id>/, write config.json
    enqueue_run(run)                                   # the django-q2 worker calls execute_run
    execute_run(run, on_event=print)                   # or run it here, in the foreground
    adopt_run(run)      # take over a running run whose supervisor died while its stage still runs
    pause_run(run)      # from any process: DB flags the supervisor polls. Pause: the stage saves and exits
    cancel_run(run)     # cancel: SIGTERM, NANOSTUDIO_CANCEL_GRACE seconds, SIGKILL
    kill_run(run)       # kill: SIGKILL now (the last resort)
    resume_run(run)     # a paused, failed or cancelled run continues from its first unfinished stage
    delete_run(run)     # rows and run directory of a run that is not active

How a run executes: each stage is a subprocess started in its own session, so
its pid is also the id of a process group that holds every process the stage
starts (torchrun's ranks, data loader workers, compiler workers). Stopping a
stage means signalling that group: SIGTERM, a grace period, then SIGKILL.
The supervisor (the queue worker or `runjob`) follows events.jsonl while the
stage runs, stores new events as RunEvent rows and polls the run's
cancel_requested flag, which is how a click in the browser reaches a worker
in another process. GPU stages lease their GPUs (GpuLease rows) so two runs
on one node never share one; a stage waits for free GPUs. A supervisor
killed with SIGKILL leaves its stage running (own session): a new one adopts
it (see "after a supervisor died" below) or marks the run interrupted.
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

from functools import lru_cache

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from studio.models import GpuLease, Run, RunEvent, StageRun, new_run_id, tail_lines
from pipeline import config, report, stages
from pipeline.checkpoints import latest_checkpoint
from pipeline.events import CONFIG_FILE, stage_log_path, tail_events, write_json_atomic

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a running stage's events and the cancel flag are checked
LOG_TAIL_LINES = 20  # lines of a failed stage's log quoted in the run's error


class RunNotQueued(Exception):
    """execute_run was asked to start a run that is not (or no longer) queued."""


class ActionError(Exception):
    """An action that the run's state does not allow; the message says why and what to do."""


# What a supervisor is asked to do with its running stage, strongest first.
KILL, CANCEL, PAUSE = "kill", "cancel", "pause"


# --- creating and queueing -------------------------------------------------------------------


def create_run(preset: str, overrides: dict | None = None, name: str = "", runs_dir: str | os.PathLike | None = None,
               owner=None) -> Run:
    """Validate the configuration, create runs/<id>/ with config.json, and the Run row.

    Raises config.ConfigError (with per-field messages) and creates nothing
    if the configuration is invalid.
    """
    cfg = config.resolve(preset, overrides or {})
    _check_host_gpus(cfg)
    run_id = new_run_id()
    run_dir = Path(runs_dir or settings.NANOSTUDIO_RUNS_DIR).resolve() / run_id
    (run_dir / "logs").mkdir(parents=True)
    try:
        write_json_atomic(run_dir / CONFIG_FILE, cfg)
        commands = config.stage_commands(cfg, str(run_dir))
        with transaction.atomic():
            run = Run.objects.create(id=run_id, name=name.strip(), preset=preset, config=cfg, directory=str(run_dir), owner=owner)
            StageRun.objects.bulk_create(
                StageRun(run=run, name=cmd.name, order=i, argv=cmd.argv) for i, cmd in enumerate(commands)
            )
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # it holds nothing but config.json yet
        raise
    log.info("created run %s (%s) in %s", run.id, preset, run_dir)
    return run


def _check_host_gpus(cfg: dict) -> None:
    gpus = host_gpu_count()
    if gpus and cfg["nproc_per_node"] > gpus:
        raise config.ConfigError({"nproc_per_node": f"this node has {gpus} GPU(s); use nproc_per_node={gpus} or fewer"})


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
    """Run the run's unfinished stages in order, in this process; return the finished run.

    on_event(event) is called for every new event a stage writes; on_stage(stage)
    whenever a stage starts or finishes; stop_check() -> True stops the run like
    cancel_run does. A failed stage fails the run and skips the rest; a paused
    one pauses it (resume_run continues from there). Stages already done (a
    resumed run) are not run again.
    KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by `runjob`) kills
    the running stage, marks the run cancelled and is re-raised; any other
    exception (e.g. the queue's timeout) does the same but marks it failed.
    """
    # The one gate against running a pipeline twice (a re-delivered queue
    # task, two `runjob`s, a double click): only one UPDATE can win.
    claimed = Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED, cancel_requested=False).update(
        status=Run.Status.RUNNING,
        started_at=Coalesce(F("started_at"), timezone.now()),
        supervisor_pid=os.getpid(),
        supervisor_host=socket.gethostname(),
        supervisor_token=process_token(),
        pause_requested=False,
        kill_requested=False,
    )
    run.refresh_from_db()
    if not claimed:
        raise RunNotQueued(f"run {run.id} is {run.status}; only a queued run can be executed")
    _notify(run)
    try:
        report.capture_environment(run.run_dir)
    except Exception:  # a report detail must never stop a training run
        log.exception("run %s: could not record the environment", run.id)
    return _supervise(run, on_event, stop_check, on_stage)


def _supervise(run: Run, on_event, stop_check, on_stage, adopted: StageRun | None = None) -> Run:
    """The stage loop of execute_run and adopt_run: this process is the run's supervisor.

    `adopted` is a stage already running (started by a supervisor that died):
    it is followed instead of started, and the stages after it run as usual.
    """
    commands = {cmd.name: cmd for cmd in config.stage_commands(run.config, str(run.run_dir))}
    outcome, error = Run.Status.DONE, ""
    try:
        for stage in run.stages.order_by("order"):
            if stage.status == StageRun.Status.DONE:
                continue
            if adopted is not None and stage.pk == adopted.pk:
                # Running already: a stop request is the follower's to carry out (signals).
                status = _adopt_stage(run, stage, on_event, on_stage, stop_check)
            else:
                request = _stop_requested(run, stop_check)
                if request:
                    outcome, error = _stopped_outcome(request, f"before {stage.name}")
                    break
                status = _run_stage(run, stage, commands.get(stage.name), on_event, on_stage, stop_check)
            _write_report(run)
            if status == StageRun.Status.CANCELLED:
                killed = Run.objects.filter(pk=run.pk, kill_requested=True).exists()
                outcome, error = Run.Status.CANCELLED, f"{'killed' if killed else 'cancelled'} during {stage.name}"
                break
            if status == StageRun.Status.PAUSED:
                outcome, error = Run.Status.PAUSED, ""
                break
            if status == StageRun.Status.FAILED:
                outcome, error = Run.Status.FAILED, _failure_message(run, stage, adopted=stage.pk == getattr(adopted, "pk", None))
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


def _stopped_outcome(request: str, where: str) -> tuple[str, str]:
    if request == PAUSE:
        return Run.Status.PAUSED, ""
    return Run.Status.CANCELLED, f"{'killed' if request == KILL else 'cancelled'} {where}"


def _resume_args(run: Run, stage: StageRun) -> list[str]:
    # A stage that saved checkpoints continues from its latest one (exactly:
    # model, optimizer, data position) instead of starting over.
    if stages.get(stage.name).resumable and latest_checkpoint(run.run_dir / "checkpoints" / stage.name):
        return ["--resume"]
    return []


def _run_stage(run, stage, command, on_event, on_stage, stop_check) -> str:
    """Run one stage to its end; return its final status."""
    log_path = stage_log_path(run.run_dir, stage.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stage.started_at = timezone.now()
    if command is None:
        return _finish_stage(stage, StageRun.Status.FAILED, None, on_stage, note=f"no command for stage {stage.name}")
    stage.argv = command.argv + _resume_args(run, stage)
    env = {**os.environ, **command.env, "PYTHONUNBUFFERED": "1"}

    gpus = None
    if stages.get(stage.name).distributed and host_gpu_count():
        gpus = lease_gpus(run, stage, run.config["nproc_per_node"], stop_check)
        if gpus is None:  # asked to stop while waiting for GPUs
            paused = (_stop_requested(run, stop_check) or CANCEL) == PAUSE
            return _finish_stage(stage, StageRun.Status.PAUSED if paused else StageRun.Status.CANCELLED, None, on_stage)
        env["CUDA_VISIBLE_DEVICES"] = stage.gpus = ",".join(map(str, gpus))
    try:
        return _run_process(run, stage, env, log_path, on_event, on_stage, stop_check)
    finally:
        if gpus is not None:
            release_gpus(run, stage)


def _run_process(run, stage, env, log_path, on_event, on_stage, stop_check) -> str:
    with open(log_path, "ab", buffering=0) as log_file:
        log_file.write(f"# {timezone.now():%Y-%m-%d %H:%M:%S} UTC nanostudio runs: {stage.command_line}\n".encode())
        try:
            proc = subprocess.Popen(
                stage.argv,
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

    try:
        # The token (pid + start time) lets a later supervisor tell this
        # process from another that got its pid, before adopting or signalling it.
        stage.pid, stage.token, stage.status, stage.note = proc.pid, process_token(proc.pid), StageRun.Status.RUNNING, ""
        stage.save(update_fields=["argv", "pid", "token", "status", "started_at", "note", "gpus"])
        _notify(run)
        if on_stage:
            on_stage(stage)
    except BaseException:
        code = terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
        _finish_stage(stage, StageRun.Status.FAILED, code, on_stage)
        raise
    return _watch(run, stage, proc, on_event, on_stage, stop_check)


def _watch(run, stage, proc, on_event, on_stage, stop_check) -> str:
    """Follow a running stage to its end (events, stop requests); return its final status.

    `proc` is the subprocess.Popen of a stage this process started, or an
    _AdoptedProcess for one a previous supervisor started.
    """
    adopted = isinstance(proc, _AdoptedProcess)
    handled = ""  # the strongest stop request acted upon so far
    pause_deadline = None
    try:
        while True:
            try:
                proc.wait(timeout=POLL_SECONDS)
                ended = True
            except subprocess.TimeoutExpired:
                ended = False
            request = _follow(run, on_event, stop_check)
            if ended:
                break
            if request == KILL and handled != KILL:
                handled = KILL
                signal_process_group(proc.pid, signal.SIGKILL)
            elif request == CANCEL and handled not in (KILL, CANCEL):
                handled = CANCEL
                terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
                break
            elif request == PAUSE and not handled:
                # The stage finishes its step, saves a checkpoint and exits (75);
                # only one that does not within the grace period is killed.
                handled = PAUSE
                signal_process_group(proc.pid, signal.SIGTERM)
                pause_deadline = time.monotonic() + settings.NANOSTUDIO_PAUSE_GRACE
            elif handled == PAUSE and time.monotonic() > pause_deadline:
                _append_log(stage, f"did not exit within {settings.NANOSTUDIO_PAUSE_GRACE:.0f} s of the pause request: killed")
                signal_process_group(proc.pid, signal.SIGKILL)
                handled = KILL
    except BaseException as e:
        code = terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
        status = StageRun.Status.CANCELLED if isinstance(e, KeyboardInterrupt) else StageRun.Status.FAILED
        _finish_stage(stage, status, None if adopted else code, on_stage)
        raise
    _kill_leftovers(proc.pid)
    late = _follow(run, on_event, stop_check)
    # An adopted stage is not our child, so its exit code is unknown: its
    # stage_end event (read after the last events are in) stands in for it.
    code = proc.returncode
    note = ""
    if adopted:
        end = _attempt_end(run, stage)
        note = (f"the adopted stage ended; its stage_end event says {end.get('status')!r}" if end else
                "the adopted stage ended without a stage_end event") + " (its exit code is unknown: not our child)"
    # A stage that ends badly just as the run is stopped (it may have been
    # signalled from outside, e.g. by a person) counts as stopped, not failed.
    if not handled and code != 0 and late:
        handled = late
    if handled in (KILL, CANCEL):
        status = StageRun.Status.CANCELLED
    elif code == 0:
        status = StageRun.Status.DONE
    elif handled == PAUSE:
        status = StageRun.Status.PAUSED
    else:
        status = StageRun.Status.FAILED
    return _finish_stage(stage, status, None if adopted else code, on_stage, note=note)


def _append_log(stage: StageRun, note: str) -> None:
    with open(stage_log_path(stage.run.run_dir, stage.name), "a") as f:
        f.write(f"# {note}\n")


def _finish_stage(stage, status, code, on_stage, note: str = "") -> str:
    stage.status, stage.exit_code, stage.finished_at = status, code, timezone.now()
    stage.save(update_fields=["argv", "status", "exit_code", "started_at", "finished_at", "gpus"])
    if note:
        _append_log(stage, note)
    _notify(stage.run)
    if on_stage:
        on_stage(stage)
    return status


def _finish_run(run: Run, outcome: str, error: str) -> None:
    if outcome == Run.Status.FAILED:
        run.stages.filter(status=StageRun.Status.QUEUED).update(status=StageRun.Status.SKIPPED)
    elif outcome == Run.Status.CANCELLED:
        run.stages.filter(status=StageRun.Status.QUEUED).update(status=StageRun.Status.CANCELLED)
    # A paused run keeps its later stages queued: resume_run runs them.
    try:
        ingest_events(run)
    except Exception:  # the run's outcome matters more than its last events
        log.exception("could not ingest the last events of run %s", run.id)
    Run.objects.filter(pk=run.pk).update(
        status=outcome, error=error, finished_at=timezone.now(),
        cancel_requested=False, kill_requested=False, pause_requested=False,
    )
    run.refresh_from_db()
    _write_report(run)
    _notify(run)
    log.info("run %s %s", run.id, outcome)


def _write_report(run: Run) -> None:
    try:
        report.write_report(run.run_dir)
    except Exception:  # a report detail must never stop a training run
        log.exception("run %s: could not write report.md", run.id)


def _failure_message(run: Run, stage: StageRun, adopted: bool = False) -> str:
    code = stage.exit_code
    if adopted:
        end = _attempt_end(run, stage)
        how = (f"its stage_end event says {end.get('status')!r}" if end else
               "it ended without a stage_end event: killed or crashed") + (
            "; it was adopted after its supervisor stopped, so its exit code is unknown")
    else:
        how = f"exit code {code}" if code is None or code >= 0 else f"killed by {signal.Signals(-code).name}"
    message = f"stage {stage.name} failed ({how})"
    last_error = run.events.filter(stage=stage.name, kind="error").order_by("-seq").first()
    if last_error and last_error.data.get("message"):
        message += f": {last_error.data['message']}"
    tail = tail_lines(stage.log_path, LOG_TAIL_LINES)
    if tail:
        message += f"\n--- last {len(tail)} lines of logs/{stage.name}.log ---\n" + "\n".join(tail)
    return message


def _follow(run: Run, on_event, stop_check) -> str:
    """Store the stage's new events; return the stop request ("" if none).

    A busy database (SQLite shared with the web process) must not kill a
    training run: the events stay in events.jsonl and are stored next time.
    """
    try:
        ingest_events(run, on_event)
        return _stop_requested(run, stop_check)
    except DatabaseError as e:
        log.warning("run %s: database unavailable, will retry: %s", run.id, e)
        return CANCEL if stop_check is not None and stop_check() else ""


def _stop_requested(run: Run, stop_check) -> str:
    """"kill", "cancel", "pause" or "" (strongest first)."""
    if stop_check is not None and stop_check():
        return CANCEL
    flags = Run.objects.filter(pk=run.pk).values_list("kill_requested", "cancel_requested", "pause_requested").first()
    if not flags:
        return CANCEL  # the run was deleted under us
    kill, cancel, pause = flags
    return KILL if kill else CANCEL if cancel else PAUSE if pause else ""


# --- GPU leases ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def host_gpu_count() -> int:
    """GPUs on this node: NANOSTUDIO_GPUS if set, else what `nvidia-smi -L` lists (0 without)."""
    if os.environ.get("NANOSTUDIO_GPUS", "").strip():
        return int(os.environ["NANOSTUDIO_GPUS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def lease_gpus(run: Run, stage: StageRun, n: int, stop_check=None) -> list[int] | None:
    """Take `n` free GPUs of this host for the stage, waiting while others hold them.

    Returns the GPU indices, or None if the run was asked to stop while waiting.
    Leases of supervisors that are gone (killed, rebooted) are taken over.
    """
    host, token, total = socket.gethostname(), process_token(), host_gpu_count()
    if n > total:
        raise RuntimeError(f"stage {stage.name} needs {n} GPUs but this node has {total}")
    waiting = False
    while True:
        for lease in GpuLease.objects.filter(host=host).exclude(holder_token=token):
            if not token_alive(lease.holder_token) and not _stage_still_running(lease):
                log.warning("taking over GPU %s from %s (its supervisor is gone)", lease.index, lease.run_id)
                lease.delete()
        held = dict(GpuLease.objects.filter(host=host).values_list("index", "run_id"))
        free = [i for i in range(total) if i not in held]
        if len(free) >= n:
            try:
                with transaction.atomic():
                    GpuLease.objects.bulk_create(
                        GpuLease(host=host, index=i, run=run, stage=stage.name, holder_token=token) for i in free[:n]
                    )
            except IntegrityError:
                continue  # another supervisor took one of them first: look again
            if stage.note:
                stage.note = ""
                stage.save(update_fields=["note"])
            return free[:n]
        if not waiting:
            waiting = True
            busy = ", ".join(sorted(set(held.values())))
            stage.note = f"waiting for {n} GPU(s): {len(held)} of {total} in use by {busy}"
            stage.save(update_fields=["note"])
            _append_log(stage, stage.note)
            _notify(run)
        if _stop_requested(run, stop_check):
            return None
        time.sleep(POLL_SECONDS)


def _stage_still_running(lease: GpuLease) -> bool:
    # A supervisor killed with SIGKILL leaves its stage training on the GPUs
    # until a new supervisor adopts it (or it ends): they are not free yet.
    tokens = StageRun.objects.filter(run_id=lease.run_id, name=lease.stage, status=StageRun.Status.RUNNING).exclude(
        token="").values_list("token", flat=True)
    return any(process_running(t) for t in tokens)


def release_gpus(run: Run, stage: StageRun) -> None:
    GpuLease.objects.filter(run=run, stage=stage.name, holder_token=process_token()).delete()


# --- live updates ----------------------------------------------------------------------------


def _notify(run: Run) -> None:
    """Wake the run's WebSocket consumers at once (only with Redis: the
    in-memory layer cannot cross processes, and consumers poll anyway)."""
    if not settings.REDIS_URL:
        return
    try:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        async_to_sync(get_channel_layer().group_send)(run_group(run.pk), {"type": "run.wake"})
    except Exception as e:  # live updates are a convenience; training goes on
        log.warning("run %s: could not notify consumers: %s", run.pk, e)


def run_group(run_id: str) -> str:
    return f"run-{run_id}"


# --- events ----------------------------------------------------------------------------------


def ingest_events(run: Run, on_event: Callable[[dict], None] | None = None) -> list[dict]:
    """Store events written since run.events_offset; return them (and pass each to on_event).

    Idempotent: rows are unique per (run, seq), so reading the same lines
    again (e.g. after a crash between insert and offset update) adds nothing.
    """
    events, offset, lines = tail_events(run.run_dir, run.events_offset, run.events_seq)
    if events:
        RunEvent.objects.bulk_create(
            [
                RunEvent(
                    run_id=run.pk,
                    seq=e["seq"],
                    stage=str(e.get("stage", ""))[:64],
                    kind=str(e.get("kind", ""))[:32],
                    step=_int_or_none(e.get("step")),
                    time=e["time"] if _finite(e.get("time")) else None,
                    data=_json_safe(e),
                )
                for e in events
            ],
            ignore_conflicts=True,
            batch_size=500,
        )
    if offset != run.events_offset:
        run.summary = summarize(run.summary, events)
        Run.objects.filter(pk=run.pk).update(events_offset=offset, events_seq=lines, summary=run.summary)
        run.events_offset, run.events_seq = offset, lines
        _notify(run)
    if on_event:
        for event in events:
            on_event(event)
    return events


# The metrics the dashboard shows per run (min/max/last), by event kind and field.
SUMMARY_METRICS = {"metric": ("loss", "smooth_loss", "tok_per_sec", "mfu"), "eval": ("val_bpb",)}


def summarize(summary: dict, events: list[dict]) -> dict:
    """Fold new events into a run's summary: progress of the latest stage and min/max/last of key metrics."""
    summary = {"metrics": {}, "totals": {}, **(summary or {})}
    for e in events:
        stage, kind = e.get("stage", ""), e.get("kind")
        if kind == "setup" and _int_or_none(e.get("num_iterations")):
            summary["totals"][stage] = int(e["num_iterations"])
        if kind == "metric":
            step, total = _int_or_none(e.get("step")), summary["totals"].get(stage)
            fraction = e.get("fraction") if _finite(e.get("fraction")) else (step / total if step is not None and total else None)
            summary["progress"] = {"stage": stage, "step": step, "total": total, "fraction": fraction}
        for name in SUMMARY_METRICS.get(kind, ()):
            value = e.get(name)
            if not _finite(value):
                continue
            m = summary["metrics"].setdefault(name, {})
            m.update(last=value, step=e.get("step"), stage=stage,
                     min=min(value, m.get("min", value)), max=max(value, m.get("max", value)))
    return summary


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_or_none(value):
    return int(value) if _finite(value) and abs(value) < 2**31 else None


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


# --- stopping, resuming, deleting ------------------------------------------------------------


def cancel_run(run: Run) -> Run:
    """Stop a run: a queued or paused one is cancelled at once; a running one is asked to stop.

    For a running run this sets cancel_requested. Its supervisor (the queue
    worker or `runjob`, maybe in another process) polls the flag, sends
    SIGTERM to the running stage's process group, waits NANOSTUDIO_CANCEL_GRACE
    seconds, sends SIGKILL, and records the run as cancelled. Only the
    supervisor signals, so a stage that shuts down cleanly on SIGTERM (saving
    a checkpoint, say) is not hit by a second one mid-way. If the supervisor
    is gone, this sends the SIGTERM and records the outcome itself.
    """
    return _request_stop(run, CANCEL)


def kill_run(run: Run) -> Run:
    """The last resort: SIGKILL every process of the running stage now (no checkpoint)."""
    return _request_stop(run, KILL)


def pause_run(run: Run) -> Run:
    """Ask the running stage to finish its step, save a checkpoint and exit; the run becomes paused.

    resume_run continues exactly from that checkpoint. A stage that does not
    exit within NANOSTUDIO_PAUSE_GRACE seconds is killed (its last periodic
    checkpoint is then the resume point).
    """
    if run.status != Run.Status.RUNNING:
        raise ActionError(f"run {run.id} is {run.status}; only a running run can be paused")
    return _request_stop(run, PAUSE)


def _request_stop(run: Run, how: str) -> Run:
    now = timezone.now()
    if how != PAUSE and Run.objects.filter(pk=run.pk, status__in=[Run.Status.QUEUED, Run.Status.PAUSED]).update(
        status=Run.Status.CANCELLED, cancel_requested=True, finished_at=now, error="cancelled before it started"
        if run.status == Run.Status.QUEUED else "cancelled while paused"
    ):
        run.stages.filter(status__in=[StageRun.Status.QUEUED, StageRun.Status.PAUSED]).update(status=StageRun.Status.CANCELLED)
    else:
        flags = {PAUSE: {"pause_requested": True}, CANCEL: {"cancel_requested": True},
                 KILL: {"kill_requested": True, "cancel_requested": True}}[how]
        if Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(**flags):
            run.refresh_from_db()
            if _supervisor_gone(run):
                # Nobody polls the flags: signal the stage ourselves and record the outcome.
                sig = signal.SIGKILL if how == KILL else signal.SIGTERM
                for stage in run.stages.filter(status=StageRun.Status.RUNNING, pid__isnull=False):
                    _signal_stage(stage, sig)
                outcome = Run.Status.PAUSED if how == PAUSE else Run.Status.CANCELLED
                _abandon(run, outcome, "" if how == PAUSE else f"{how} (its supervisor was no longer running)")
    run.refresh_from_db()
    _notify(run)
    return run


def resume_run(run: Run, enqueue: bool = True, gpus: int | str | None = None) -> Run:
    """Queue a paused, failed or cancelled run again; it continues from its first unfinished stage.

    Finished stages are kept; the stage that stopped restarts from its latest
    checkpoint when it has one (see _resume_args), the rest run as planned.
    `gpus` moves the run to that many GPUs per node (nodes fail, GPUs get
    taken): a training stage re-shards its checkpoint and keeps the global
    batch, and refuses, naming the counts that work, a count that does not
    divide its data streams (ranks x accumulation steps when it was saved).
    """
    cfg = None
    if gpus not in (None, ""):
        try:
            cfg = config.validate({**run.config, "nproc_per_node": gpus})
        except config.ConfigError as e:
            # The batch cannot change on a resume, so "use another total_batch_size" is no fix here:
            # name the counts the one validation accepts for this run instead.
            valid = [n for n in range(1, 65) if _valid({**run.config, "nproc_per_node": n})]
            raise config.ConfigError({"nproc_per_node": "; ".join(e.errors.values()) + "."
                                      f" This run can resume on "
                                      f"{', '.join(map(str, valid))} GPU(s) per node (same global batch)"}) from None
        if cfg["nproc_per_node"] == run.config.get("nproc_per_node"):
            cfg = None
        else:
            _check_host_gpus(cfg)
    with transaction.atomic():
        if not Run.objects.filter(pk=run.pk, status__in=Run.RESUMABLE).update(
            status=Run.Status.QUEUED, error="", finished_at=None, queued_at=timezone.now(),
            cancel_requested=False, kill_requested=False, pause_requested=False,
        ):
            run.refresh_from_db()
            raise ActionError(f"run {run.id} is {run.status}; only a paused, failed or cancelled run can be resumed")
        if cfg is not None:
            # config.json first: a kill between the two leaves the file ahead of the row, and the
            # row (rolled back with the status) is what a retry of the resume starts from.
            write_json_atomic(run.run_dir / CONFIG_FILE, cfg)
            Run.objects.filter(pk=run.pk).update(config=cfg)  # stage commands are built from it at each start
        run.stages.exclude(status=StageRun.Status.DONE).update(
            status=StageRun.Status.QUEUED, exit_code=None, pid=None, token="", finished_at=None, note="")
    run.refresh_from_db()
    with open(run.run_dir / "logs" / "studio.log", "a") as f:
        moved = f" on {gpus} GPU(s) per node" if cfg is not None else ""
        f.write(f"# {timezone.now():%Y-%m-%d %H:%M:%S} UTC resumed{moved}\n")
    if enqueue:
        enqueue_run(run)
    _notify(run)
    return run


def _valid(cfg: dict) -> bool:
    try:
        config.validate(cfg)
    except config.ConfigError:
        return False
    return True


def delete_run(run: Run) -> None:
    """Delete a run that is not active: its rows and its run directory (checkpoints included)."""
    if run.is_active:
        raise ActionError(f"run {run.id} is {run.status}; stop it before deleting it")
    run_dir = run.run_dir
    # Only ever remove a folder that is this run's own directory.
    if run_dir.name == run.id and run_dir.is_dir() and (run_dir / CONFIG_FILE).is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
    run.delete()
    log.info("deleted run %s and %s", run.id, run_dir)


def _supervisor_gone(run: Run) -> bool:
    # Only answerable on the supervisor's own host (runs may share a database across nodes).
    if not run.supervisor_pid or run.supervisor_host != socket.gethostname():
        return False
    if run.supervisor_token:
        return not token_alive(run.supervisor_token)
    return not pid_alive(run.supervisor_pid)


# --- after a supervisor died: adopt or reap ---------------------------------------------------
#
# A queue worker or `runjob` killed with SIGKILL (or a reboot) cannot record
# its run's end: the run stays "running" with a supervisor that is gone. Its
# stage runs in its own session, so it survives the kill and goes on
# training. A new supervisor (a queue worker as it starts, or before its next
# task; `runjob --resume`) then either adopts the run, when the stage's
# process is still the one that was started (pid *and* start time, so a
# reused pid never counts) or ended with stage_end "done", or else marks it
# failed (interrupted, resumable from its last checkpoint).


class RunNotOrphaned(Exception):
    """adopt_run was asked to take over a run that has a live supervisor, or nothing to follow."""


# What a stage's stage_end status means, as the exit code a supervisor would have
# seen (an adopted stage is not our child: no waitpid, no exit code).
STAGE_END_CODES = {"done": 0, "failed": 1, "interrupted": 75, "cancelled": 130}


def orphaned_runs() -> list[Run]:
    """Runs marked running on this host whose supervisor process is gone, oldest first."""
    runs = Run.objects.filter(status=Run.Status.RUNNING, supervisor_host=socket.gethostname()).order_by("created_at")
    return [run for run in runs if _supervisor_gone(run)]


def adoptable_stage(run: Run) -> StageRun | None:
    """The stage a new supervisor can follow for an orphaned run, or None.

    Its process must still be the very one that was started (token: boot id,
    pid and start time), or it must have ended with stage_end "done" (its
    work is kept and the run goes on). A run orphaned between stages, a stage
    recorded without a token, or one that died any other way is not
    adoptable: it is reaped.
    """
    stage = run.stages.filter(status=StageRun.Status.RUNNING).order_by("order").first()
    if stage is None or not stage.pid or not stage.token or _token_pid(stage.token) != stage.pid:
        return None
    if process_running(stage.token):
        return stage
    # It ended while nobody watched (a zombie of ours counts as ended).
    end = _attempt_end(run, stage)
    return stage if end and end.get("status") == "done" else None


def adopt_run(
    run: Run,
    on_event: Callable[[dict], None] | None = None,
    stop_check: Callable[[], bool] | None = None,
    on_stage: Callable[[StageRun], None] | None = None,
) -> Run:
    """Become the supervisor of an orphaned run and see it to its end, like execute_run.

    The running stage is followed where the dead supervisor left it (events
    from the stored offset, cancel/pause/kill through signals to its process
    group, its end detected by polling since it is not our child); then the
    remaining stages run as usual. Raises RunNotOrphaned when the run has a
    live supervisor (e.g. another worker adopted it first) or nothing to adopt.
    """
    run.refresh_from_db()
    if run.status != Run.Status.RUNNING or not _supervisor_gone(run):
        raise RunNotOrphaned(f"run {run.id} is {run.status} with a live supervisor")
    stage = adoptable_stage(run)
    if stage is None:
        raise RunNotOrphaned(f"run {run.id}: no running stage to adopt")
    me = process_token()
    # Only one new supervisor can win: the UPDATE matches the dead one's identity.
    claimed = Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING, supervisor_host=run.supervisor_host,
                                 supervisor_pid=run.supervisor_pid, supervisor_token=run.supervisor_token).update(
        supervisor_pid=os.getpid(), supervisor_host=socket.gethostname(), supervisor_token=me)
    if not claimed:
        raise RunNotOrphaned(f"run {run.id} was taken over by another supervisor")
    previous = run.supervisor_pid
    # The stage's GPUs stay its own: leases follow the supervisor.
    GpuLease.objects.filter(run=run, stage=stage.name).update(holder_token=me)
    run.refresh_from_db()
    note = (f"{timezone.now():%Y-%m-%d %H:%M:%S} UTC adopted by the supervisor pid {os.getpid()} on "
            f"{socket.gethostname()}: the previous one (pid {previous}) stopped while this stage ran")
    _append_log(stage, note)
    log.warning("run %s: %s (stage %s, pid %s)", run.id, note, stage.name, stage.pid)
    _notify(run)
    return _supervise(run, on_event, stop_check, on_stage, adopted=stage)


def adopt_orphaned_runs(**callbacks) -> list[Run]:
    """Adopt this host's orphaned runs one after another, each to its end; return them.

    A worker calls this as it starts: with several workers starting at once,
    each adopts a different run (adopt_run's claim), and one that finds none
    left goes on to take tasks.
    """
    adopted = []
    while True:
        for run in orphaned_runs():
            if adoptable_stage(run) is None:
                continue
            try:
                adopted.append(adopt_run(run, **callbacks))
            except RunNotOrphaned as e:
                log.info("%s", e)
                continue
            break  # it took a while: look again
        else:
            return adopted


def reap_orphaned_runs(keep_adoptable: bool = False) -> list[Run]:
    """Mark this host's orphaned runs failed (interrupted, resumable) and stop their stages.

    A queue worker or `runjob` killed with SIGKILL (or a reboot) cannot record
    its run's end; call this before starting work so such runs do not stay
    "running" forever. Their stage process groups get SIGTERM (only when the
    stage's process is verifiably the one that was started). With
    keep_adoptable, runs that adopt_run can take over are left running.
    """
    reaped = []
    for run in orphaned_runs():
        if keep_adoptable and adoptable_stage(run) is not None:
            continue
        for stage in run.stages.filter(status=StageRun.Status.RUNNING, pid__isnull=False):
            _signal_stage(stage, signal.SIGTERM)
        if _abandon(run, Run.Status.FAILED, f"interrupted: its supervisor (pid {run.supervisor_pid}) stopped without "
                                            "finishing the run (killed, crashed or the machine restarted); resume it "
                                            "to continue from its last checkpoint"):
            GpuLease.objects.filter(run=run).delete()
            reaped.append(run)
    return reaped


def _attempt_end(run: Run, stage: StageRun) -> dict | None:
    """The stage_end event of the stage's current attempt (the one started at stage.started_at), if written.

    Looks at the stored events and at the lines of events.jsonl not stored yet.
    """
    since = stage.started_at.timestamp() - 1.0 if stage.started_at else 0.0  # 1 s: the stage stamps after we do
    stored = [dict(e.data, seq=e.seq) for e in run.events.filter(stage=stage.name, kind__in=("stage_start", "stage_end"))
              .order_by("seq")]
    run_offset = Run.objects.filter(pk=run.pk).values_list("events_offset", "events_seq").first() or (0, 0)
    fresh, _, _ = tail_events(run.run_dir, *run_offset)
    last = None
    for event in [*stored, *fresh]:
        if (event.get("stage") == stage.name and event.get("kind") in ("stage_start", "stage_end")
                and _finite(event.get("time")) and event["time"] >= since):
            last = event
    return last if last and last.get("kind") == "stage_end" else None


class _AdoptedProcess:
    """The stage process a dead supervisor started, as far as _watch needs a Popen.

    It is not our child, so there is no waitpid: wait() polls whether the
    process that the token names is still running, and returncode comes from
    the stage's stage_end event (None when it wrote none).
    """

    def __init__(self, run: Run, stage: StageRun):
        self.run, self.stage, self.pid, self.token = run, stage, stage.pid, stage.token

    def wait(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while process_running(self.token):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05 if left is None else min(0.05, left))
        return self.returncode

    @property
    def returncode(self) -> int | None:
        end = _attempt_end(self.run, self.stage)
        return STAGE_END_CODES.get(end.get("status")) if end else None


def _adopt_stage(run, stage, on_event, on_stage, stop_check) -> str:
    try:
        if on_stage:
            on_stage(stage)
        return _watch(run, stage, _AdoptedProcess(run, stage), on_event, on_stage, stop_check)
    finally:
        release_gpus(run, stage)


def _signal_stage(stage: StageRun, sig: int) -> bool:
    """Signal a stage's process group from outside its supervisor, if it is still that stage's."""
    if not stage.pid:
        return False
    if stage.token and not token_alive(stage.token) and pid_alive(stage.pid):
        return False  # its pid now belongs to another process: never signal that one
    return signal_process_group(stage.pid, sig)


def _abandon(run: Run, outcome: str, error: str) -> bool:
    """Record the end of a run whose supervisor is gone; False if a new supervisor took it meanwhile."""
    stage_status = {Run.Status.CANCELLED: StageRun.Status.CANCELLED, Run.Status.PAUSED: StageRun.Status.PAUSED}.get(
        outcome, StageRun.Status.FAILED)
    now = timezone.now()
    with transaction.atomic():
        # Matching the dead supervisor's identity: never overwrite a run that was adopted in the meantime.
        if not Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING, supervisor_pid=run.supervisor_pid,
                                  supervisor_token=run.supervisor_token).update(
                status=outcome, error=error, finished_at=now, cancel_requested=False, kill_requested=False,
                pause_requested=False):
            return False
        run.stages.filter(status=StageRun.Status.RUNNING).update(status=stage_status, finished_at=now)
        if outcome != Run.Status.PAUSED:
            run.stages.filter(status=StageRun.Status.QUEUED).update(
                status=StageRun.Status.CANCELLED if outcome == Run.Status.CANCELLED else StageRun.Status.SKIPPED
            )
    return True


# --- processes -------------------------------------------------------------------------------


def process_token(pid: int | None = None) -> str:
    """boot id : pid : start time of a process, which no other process (now or after a reboot) shares."""
    pid = pid or os.getpid()
    return f"{_boot_id()}:{pid}:{_start_time(pid)}"


def token_alive(token: str) -> bool:
    """Is the process a process_token() names still there (a zombie counts)?"""
    pid = _token_pid(token)
    if pid is None:
        return False
    boot, _, start = token.rsplit(":", 2)
    if boot != _boot_id() or not pid_alive(pid):
        return False
    return start == _start_time(pid)


def process_running(token: str) -> bool:
    """Is the process a process_token() names still running: there, and not a zombie?

    A stage whose supervisor died is nobody's child to reap; in a container
    whose init does not reap orphans it may stay a zombie forever.
    """
    return token_alive(token) and _stat_fields(_token_pid(token))[:1] not in (["Z"], ["X"], [])


def _token_pid(token: str) -> int | None:
    try:
        return int(token.rsplit(":", 2)[1])
    except (ValueError, IndexError):
        return None


@lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, ...), [] if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()  # the command name (field 2) may hold spaces


def _start_time(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""  # field 22: start time in clock ticks since boot


def process_started_at(pid: int) -> float | None:
    """Unix time at which process `pid` started (to ~10 ms), None if it is gone."""
    ticks = _start_time(pid)
    if not ticks:
        return None
    # Start times count from boot, CLOCK_BOOTTIME's zero.
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + int(ticks) / os.sysconf("SC_CLK_TCK")


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
