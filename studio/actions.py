"""Everything that changes a run's state. Views, tasks and `runjob` call these.

    cfg = config.resolve("tiny", {"vocab_size": "4096"})   # the form or runjob resolves (raises ConfigError)
    run = create_run(cfg)          # make runs/<id>/, write config.json, the Run row and its stages
    enqueue_run(run)               # the django-q2 worker calls execute_run
    execute_run(run, on_event=print)   # or run it here, in the foreground (this process supervises it)
    adopt_run(run)      # take over a running run whose supervisor died while its stage still runs
    pause_run(run)      # from any process: DB flags the supervisor polls. Pause: the stage saves and exits
    cancel_run(run)     # cancel: SIGTERM, NANOSTUDIO_CANCEL_GRACE seconds, SIGKILL
    kill_run(run)       # kill: SIGKILL now (the last resort)
    resume_run(run)     # a paused, failed or cancelled run continues from its first unfinished stage
    delete_run(run)     # rows and run directory of a run that is not active

How a run executes (the stage loop, stop requests, signals) is the
supervisor's: studio/supervisor.py. A request from a page sets a flag on the
run that its supervisor, maybe in another process, polls; when the
supervisor is gone (killed, or the machine restarted) the action signals the
stage itself and records the outcome.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Callable

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from studio import supervisor
from studio.ingest import notify
from studio.leases import host_gpu_count
from studio.models import GpuLease, Run, StageRun, new_run_id
from studio.processes import process_token, signal_token_group
from studio.supervisor import Stop
from pipeline import config, report
from pipeline.events import CONFIG_FILE, write_json_atomic

log = logging.getLogger(__name__)


class ActionError(Exception):
    """An action that the run's state does not allow; the message says why and what to do."""


class RunNotQueued(Exception):
    """execute_run was asked to start a run that is not (or no longer) queued."""


class RunNotOrphaned(Exception):
    """adopt_run was asked to take over a run that has a live supervisor, or nothing to follow."""


# --- creating and queueing -------------------------------------------------------------------


def create_run(cfg: dict | str, overrides: dict | None = None, name: str = "",
               runs_dir: str | os.PathLike | None = None, owner=None) -> Run:
    """Create runs/<id>/ with config.json, the Run row and its stages; return the run.

    `cfg` is a resolved configuration, as config.resolve returns it: the web
    form and `runjob` resolve (and word any errors for their user) before
    calling this, and it is stored as it is, not judged a second time.
    Scripts and tests may give a preset name and `overrides` instead, which
    are resolved here (config.ConfigError if invalid). The one check left is
    this node's own: asking for more GPUs per node than it has raises
    config.ConfigError. Nothing is created when anything raises.
    """
    if isinstance(cfg, str):
        cfg = config.resolve(cfg, overrides or {})
    elif overrides:
        raise TypeError("create_run: overrides go with a preset name; a resolved configuration already holds them")
    _check_host_gpus(cfg)
    run_id = new_run_id()
    run_dir = Path(runs_dir or settings.NANOSTUDIO_RUNS_DIR).resolve() / run_id
    (run_dir / "logs").mkdir(parents=True)
    try:
        write_json_atomic(run_dir / CONFIG_FILE, cfg)
        with transaction.atomic():
            run = Run.objects.create(id=run_id, name=name.strip(), preset=cfg.get("preset", ""), config=cfg,
                                     directory=str(run_dir), owner=owner)
            # Each stage's planned command, shown until the stage starts; its supervisor then
            # derives it again from the stored configuration and records the one it runs.
            StageRun.objects.bulk_create(
                StageRun(run=run, name=cmd.name, order=i, argv=cmd.argv)
                for i, cmd in enumerate(supervisor.stage_commands(run).values())
            )
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # it holds nothing but config.json yet
        raise
    log.info("created run %s (%s) in %s", run.id, run.preset, run_dir)
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
    """Claim a queued run and run its unfinished stages in order, in this process; return the finished run.

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
    notify(run)
    try:
        report.capture_environment(run.run_dir)
    except Exception:  # a report detail must never stop a training run
        log.exception("run %s: could not record the environment", run.id)
    return supervisor.supervise(run, on_event, stop_check, on_stage)


# --- after a supervisor died: adopt or reap (see studio/supervisor.py) -----------------------


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
    if run.status != Run.Status.RUNNING or not supervisor.supervisor_gone(run):
        raise RunNotOrphaned(f"run {run.id} is {run.status} with a live supervisor")
    stage = supervisor.adoptable_stage(run)
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
    stage.append_log(note)
    log.warning("run %s: %s (stage %s, pid %s)", run.id, note, stage.name, stage.pid)
    notify(run)
    return supervisor.supervise(run, on_event, stop_check, on_stage, adopted=stage)


def adopt_orphaned_runs(**callbacks) -> list[Run]:
    """Adopt this host's orphaned runs one after another, each to its end; return them.

    A worker calls this as it starts: with several workers starting at once,
    each adopts a different run (adopt_run's claim), and one that finds none
    left goes on to take tasks.
    """
    adopted = []
    while True:
        for run in supervisor.orphaned_runs():
            if supervisor.adoptable_stage(run) is None:
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
    for run in supervisor.orphaned_runs():
        if keep_adoptable and supervisor.adoptable_stage(run) is not None:
            continue
        for stage in run.stages.filter(status=StageRun.Status.RUNNING, pid__isnull=False):
            signal_token_group(stage.pid, stage.token, signal.SIGTERM)
        if _abandon(run, Run.Status.FAILED, f"interrupted: its supervisor (pid {run.supervisor_pid}) stopped without "
                                            "finishing the run (killed, crashed or the machine restarted); resume it "
                                            "to continue from its last checkpoint"):
            GpuLease.objects.filter(run=run).delete()
            reaped.append(run)
    return reaped


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
    return _request_stop(run, Stop.CANCEL)


def kill_run(run: Run) -> Run:
    """The last resort: SIGKILL every process of the running stage now (no checkpoint)."""
    return _request_stop(run, Stop.KILL)


def pause_run(run: Run) -> Run:
    """Ask the running stage to finish its step, save a checkpoint and exit; the run becomes paused.

    resume_run continues exactly from that checkpoint. A stage that does not
    exit within NANOSTUDIO_PAUSE_GRACE seconds is killed (its last periodic
    checkpoint is then the resume point).
    """
    if run.status != Run.Status.RUNNING:
        raise ActionError(f"run {run.id} is {run.status}; only a running run can be paused")
    return _request_stop(run, Stop.PAUSE)


def _request_stop(run: Run, how: Stop) -> Run:
    now = timezone.now()
    if how != Stop.PAUSE and Run.objects.filter(pk=run.pk, status__in=[Run.Status.QUEUED, Run.Status.PAUSED]).update(
        status=Run.Status.CANCELLED, cancel_requested=True, finished_at=now, error="cancelled before it started"
        if run.status == Run.Status.QUEUED else "cancelled while paused"
    ):
        run.stages.filter(status__in=[StageRun.Status.QUEUED, StageRun.Status.PAUSED]).update(status=StageRun.Status.CANCELLED)
    else:
        flags = {Stop.PAUSE: {"pause_requested": True}, Stop.CANCEL: {"cancel_requested": True},
                 Stop.KILL: {"kill_requested": True, "cancel_requested": True}}[how]
        if Run.objects.filter(pk=run.pk, status=Run.Status.RUNNING).update(**flags):
            run.refresh_from_db()
            if supervisor.supervisor_gone(run):
                # Nobody polls the flags: signal the stage ourselves and record the outcome.
                sig = signal.SIGKILL if how == Stop.KILL else signal.SIGTERM
                for stage in run.stages.filter(status=StageRun.Status.RUNNING, pid__isnull=False):
                    signal_token_group(stage.pid, stage.token, sig)
                outcome = Run.Status.PAUSED if how == Stop.PAUSE else Run.Status.CANCELLED
                _abandon(run, outcome, "" if how == Stop.PAUSE else f"{how.word} (its supervisor was no longer running)")
    run.refresh_from_db()
    notify(run)
    return run


def resume_run(run: Run, enqueue: bool = True, gpus: int | str | None = None) -> Run:
    """Queue a paused, failed or cancelled run again; it continues from its first unfinished stage.

    Finished stages are kept; the stage that stopped restarts from its latest
    checkpoint when it has one (the supervisor adds --resume), the rest run as planned.
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
    notify(run)
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
