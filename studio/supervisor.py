"""A run's supervisor: runs its stages as subprocesses, follows them, stops them when asked.

The supervisor is the process that executes a run (a django-q2 worker or
`manage.py runjob`, through studio.actions.execute_run / adopt_run):

    supervise(run, on_event=print)       # the run's unfinished stages, in order, to the run's end

Each stage is a subprocess started in its own session, so its pid is also
the id of a process group that holds every process the stage starts
(torchrun's ranks, data loader workers, compiler workers). While a stage
runs, the supervisor stores its new events (studio/ingest.py) and polls the
run's stop flags, which is how a click in the browser (studio/actions.py,
maybe in another process) reaches it. A stop request is a Stop: pause
(SIGTERM; the stage saves a checkpoint and exits), cancel (SIGTERM, a grace
period, SIGKILL) or kill (SIGKILL now). GPU stages lease their GPUs first
(studio/leases.py). The command lines are derived here, from the run's
stored configuration (Run.config, the same as config.json) as the supervisor
starts; each stage records the one it runs as it starts (StageRun.argv,
with --resume when it continues from a checkpoint).

A supervisor killed with SIGKILL leaves its stage running (own session). A
new supervisor can adopt it (adoptable_stage: its process must still be the
very one that was started, by process token; studio/processes.py) and
follow it to its end like one it started, or the run is marked interrupted.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import subprocess
import time
from typing import Callable

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from studio import ingest
from studio.leases import host_gpu_count, lease_gpus, release_gpus
from studio.models import Run, StageRun, tail_lines
from studio.processes import (
    kill_leftovers, pid_alive, process_running, process_token, signal_process_group, terminate_process_group, token_alive,
    token_pid,
)
from pipeline import config, report, stages
from pipeline.harness import END_STATUS_CODES
from pipeline.checkpoints import latest_checkpoint
from pipeline.events import stage_log_path, tail_events

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often a running stage's events and the stop flags are checked
LOG_TAIL_LINES = 20  # lines of a failed stage's log quoted in the run's error

# An adopted stage is not our child (no waitpid, no exit code): its stage_end status
# says which exit code it had, as pipeline/harness.py maps them.


class Stop(enum.IntEnum):
    """A request to stop a running stage, weakest first: a stronger one overrides a weaker one.

    While a stage runs, the same values record what the supervisor has done
    about it so far, so each request is carried out once and only a stronger
    one follows (a pause that runs out of time becomes a kill).
    """

    NONE = 0  # go on
    PAUSE = 1  # SIGTERM: the stage finishes its step, saves a checkpoint and exits (75); SIGKILL after the grace
    CANCEL = 2  # SIGTERM, NANOSTUDIO_CANCEL_GRACE seconds, SIGKILL
    KILL = 3  # SIGKILL now

    @property
    def word(self) -> str:
        return self.name.lower()


def stop_requested(run: Run, stop_check: Callable[[], bool] | None = None) -> Stop:
    """The strongest stop request for the run: stop_check() (counts as cancel), then its flags in the database."""
    if stop_check is not None and stop_check():
        return Stop.CANCEL
    flags = Run.objects.filter(pk=run.pk).values_list("kill_requested", "cancel_requested", "pause_requested").first()
    if not flags:
        return Stop.CANCEL  # the run was deleted under us
    kill, cancel, pause = flags
    return Stop.KILL if kill else Stop.CANCEL if cancel else Stop.PAUSE if pause else Stop.NONE


def stage_commands(run: Run) -> dict[str, config.StageCommand]:
    """The command of each stage of the run, from its stored configuration (Run.config, the same as config.json)."""
    return {cmd.name: cmd for cmd in config.stage_commands(run.config, str(run.run_dir))}


def supervise(
    run: Run,
    on_event: Callable[[dict], None] | None = None,
    stop_check: Callable[[], bool] | None = None,
    on_stage: Callable[[StageRun], None] | None = None,
    adopted: StageRun | None = None,
) -> Run:
    """Run the run's unfinished stages in order, in this process, and record how the run ends.

    The caller has claimed the run (it is running, with this process as its
    supervisor). on_event(event) is called for every new event a stage
    writes; on_stage(stage) whenever a stage starts or finishes; stop_check()
    -> True stops the run like a cancel. A failed stage fails the run and
    skips the rest; a paused one pauses it. Stages already done are not run
    again. `adopted` is a stage already running (started by a supervisor
    that died): it is followed instead of started, and the stages after it
    run as usual.
    KeyboardInterrupt kills the running stage, marks the run cancelled and is
    re-raised; any other exception does the same but marks it failed.
    """
    return _Supervisor(run, on_event, stop_check, on_stage).supervise(adopted)


class _Supervisor:
    def __init__(self, run: Run, on_event, stop_check, on_stage):
        self.run, self.on_event, self.stop_check, self.on_stage = run, on_event, stop_check, on_stage

    def supervise(self, adopted: StageRun | None) -> Run:
        run = self.run
        commands = stage_commands(run)
        outcome, error = Run.Status.DONE, ""
        try:
            for stage in run.stages.order_by("order"):
                if stage.status == StageRun.Status.DONE:
                    continue
                if adopted is not None and stage.pk == adopted.pk:
                    # Running already: a stop request is the follower's to carry out (signals).
                    status = self._adopt_stage(stage)
                else:
                    request = self._stop_requested()
                    if request:
                        outcome, error = _stopped_outcome(request, f"before {stage.name}")
                        break
                    status = self._run_stage(stage, commands.get(stage.name))
                write_report(run)
                if status == StageRun.Status.CANCELLED:
                    killed = Run.objects.filter(pk=run.pk, kill_requested=True).exists()
                    outcome, error = Run.Status.CANCELLED, f"{'killed' if killed else 'cancelled'} during {stage.name}"
                    break
                if status == StageRun.Status.PAUSED:
                    outcome, error = Run.Status.PAUSED, ""
                    break
                if status == StageRun.Status.FAILED:
                    outcome = Run.Status.FAILED
                    error = _failure_message(run, stage, adopted=stage.pk == getattr(adopted, "pk", None))
                    break
        except KeyboardInterrupt:
            outcome, error = Run.Status.CANCELLED, "interrupted (Ctrl-C or SIGTERM to the supervisor)"
            raise
        except BaseException as e:
            outcome, error = Run.Status.FAILED, f"supervisor stopped: {type(e).__name__}: {e}"
            raise
        finally:
            self._finish_run(outcome, error)
        return run

    def _stop_requested(self) -> Stop:
        return stop_requested(self.run, self.stop_check)

    # --- one stage ---------------------------------------------------------------------------

    def _run_stage(self, stage: StageRun, command: config.StageCommand | None) -> str:
        """Run one stage to its end; return its final status."""
        run = self.run
        log_path = stage_log_path(run.run_dir, stage.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stage.started_at = timezone.now()
        if command is None:
            return self._finish_stage(stage, StageRun.Status.FAILED, None, note=f"no command for stage {stage.name}")
        # The command as run, shown on the run page from now on.
        stage.argv = command.argv + _resume_args(run, stage)
        env = {**os.environ, **command.env, "PYTHONUNBUFFERED": "1"}

        gpus = None
        if stages.get(stage.name).distributed and host_gpu_count():
            gpus = lease_gpus(run, stage, run.config["nproc_per_node"], lambda: bool(self._stop_requested()))
            if gpus is None:  # asked to stop while waiting for GPUs
                paused = (self._stop_requested() or Stop.CANCEL) == Stop.PAUSE
                return self._finish_stage(stage, StageRun.Status.PAUSED if paused else StageRun.Status.CANCELLED, None)
            env["CUDA_VISIBLE_DEVICES"] = stage.gpus = ",".join(map(str, gpus))
        try:
            return self._run_process(stage, env, log_path)
        finally:
            if gpus is not None:
                release_gpus(run, stage)

    def _run_process(self, stage: StageRun, env: dict, log_path) -> str:
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
                return self._finish_stage(stage, StageRun.Status.FAILED, None)

        try:
            # The token (boot id, pid, start time) lets a later supervisor tell this
            # process from another that got its pid, before adopting or signalling it.
            stage.pid, stage.token, stage.status, stage.note = (
                proc.pid, process_token(proc.pid), StageRun.Status.RUNNING, "")
            stage.save(update_fields=["argv", "pid", "token", "status", "started_at", "note", "gpus"])
            ingest.notify(self.run)
            if self.on_stage:
                self.on_stage(stage)
        except BaseException:
            code = terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
            self._finish_stage(stage, StageRun.Status.FAILED, code)
            raise
        return self._watch(stage, proc)

    def _adopt_stage(self, stage: StageRun) -> str:
        try:
            if self.on_stage:
                self.on_stage(stage)
            return self._watch(stage, _AdoptedProcess(self.run, stage))
        finally:
            release_gpus(self.run, stage)

    def _watch(self, stage: StageRun, proc) -> str:
        """Follow a running stage to its end (events, stop requests); return its final status.

        `proc` is the subprocess.Popen of a stage this process started, or an
        _AdoptedProcess for one a previous supervisor started.
        """
        adopted = isinstance(proc, _AdoptedProcess)
        # What has been done about stop requests so far (`done`), and what a request changes:
        #   NONE --pause--> PAUSE: SIGTERM, and a deadline --passed--> KILL: SIGKILL
        #   NONE or PAUSE --cancel--> CANCEL: SIGTERM, grace, SIGKILL, and stop watching
        #   anything but KILL --kill--> KILL: SIGKILL, and wait for the exit
        done = Stop.NONE
        pause_deadline = 0.0
        try:
            while True:
                try:
                    proc.wait(timeout=POLL_SECONDS)
                    ended = True
                except subprocess.TimeoutExpired:
                    ended = False
                request = self._follow()
                if ended:
                    break
                if request == Stop.KILL and done != Stop.KILL:
                    done = Stop.KILL
                    signal_process_group(proc.pid, signal.SIGKILL)
                elif request == Stop.CANCEL and done < Stop.CANCEL:
                    done = Stop.CANCEL
                    terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
                    break
                elif request == Stop.PAUSE and done == Stop.NONE:
                    # The stage finishes its step, saves a checkpoint and exits (75);
                    # only one that does not within the grace period is killed.
                    done = Stop.PAUSE
                    signal_process_group(proc.pid, signal.SIGTERM)
                    pause_deadline = time.monotonic() + settings.NANOSTUDIO_PAUSE_GRACE
                elif done == Stop.PAUSE and time.monotonic() > pause_deadline:
                    stage.append_log(f"did not exit within {settings.NANOSTUDIO_PAUSE_GRACE:.0f} s of the pause request: killed")
                    signal_process_group(proc.pid, signal.SIGKILL)
                    done = Stop.KILL
        except BaseException as e:
            code = terminate_process_group(proc, settings.NANOSTUDIO_CANCEL_GRACE)
            status = StageRun.Status.CANCELLED if isinstance(e, KeyboardInterrupt) else StageRun.Status.FAILED
            self._finish_stage(stage, status, None if adopted else code)
            raise
        kill_leftovers(proc.pid)
        late = self._follow()
        # An adopted stage is not our child, so its exit code is unknown: its
        # stage_end event (read after the last events are in) stands in for it.
        code = proc.returncode
        note = ""
        if adopted:
            end = _attempt_end(self.run, stage)
            note = (f"the adopted stage ended; its stage_end event says {end.get('status')!r}" if end else
                    "the adopted stage ended without a stage_end event") + " (its exit code is unknown: not our child)"
        # A stage that ends badly just as the run is stopped (it may have been
        # signalled from outside, e.g. by a person) counts as stopped, not failed.
        if done == Stop.NONE and code != 0 and late:
            done = late
        if done in (Stop.KILL, Stop.CANCEL):
            status = StageRun.Status.CANCELLED
        elif code == 0:
            status = StageRun.Status.DONE
        elif done == Stop.PAUSE:
            status = StageRun.Status.PAUSED
        else:
            status = StageRun.Status.FAILED
        return self._finish_stage(stage, status, None if adopted else code, note=note)

    def _follow(self) -> Stop:
        """Store the stage's new events; return the stop request.

        A busy database (SQLite shared with the web process) must not kill a
        training run: the events stay in events.jsonl and are stored next time.
        """
        try:
            ingest.ingest_events(self.run, self.on_event)
            return self._stop_requested()
        except DatabaseError as e:
            log.warning("run %s: database unavailable, will retry: %s", self.run.id, e)
            return Stop.CANCEL if self.stop_check is not None and self.stop_check() else Stop.NONE

    # --- endings -----------------------------------------------------------------------------

    def _finish_stage(self, stage: StageRun, status: str, code: int | None, note: str = "") -> str:
        stage.status, stage.exit_code, stage.finished_at = status, code, timezone.now()
        stage.save(update_fields=["argv", "status", "exit_code", "started_at", "finished_at", "gpus"])
        if note:
            stage.append_log(note)
        ingest.notify(stage.run)
        if self.on_stage:
            self.on_stage(stage)
        return status

    def _finish_run(self, outcome: str, error: str) -> None:
        run = self.run
        if outcome == Run.Status.FAILED:
            run.stages.filter(status=StageRun.Status.QUEUED).update(status=StageRun.Status.SKIPPED)
        elif outcome == Run.Status.CANCELLED:
            run.stages.filter(status=StageRun.Status.QUEUED).update(status=StageRun.Status.CANCELLED)
        # A paused run keeps its later stages queued: resume_run runs them.
        try:
            ingest.ingest_events(run)
        except Exception:  # the run's outcome matters more than its last events
            log.exception("could not ingest the last events of run %s", run.id)
        Run.objects.filter(pk=run.pk).update(
            status=outcome, error=error, finished_at=timezone.now(),
            cancel_requested=False, kill_requested=False, pause_requested=False,
        )
        run.refresh_from_db()
        write_report(run)
        ingest.notify(run)
        log.info("run %s %s", run.id, outcome)


def _stopped_outcome(request: Stop, where: str) -> tuple[str, str]:
    if request == Stop.PAUSE:
        return Run.Status.PAUSED, ""
    return Run.Status.CANCELLED, f"{'killed' if request == Stop.KILL else 'cancelled'} {where}"


def _resume_args(run: Run, stage: StageRun) -> list[str]:
    # A stage that saved checkpoints continues from its latest one (exactly:
    # model, optimizer, data position) instead of starting over.
    if stages.get(stage.name).resumable and latest_checkpoint(run.run_dir / "checkpoints" / stage.name):
        return ["--resume"]
    return []


def write_report(run: Run) -> None:
    """Write runs/<id>/report.md; a failure is logged, never raised."""
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


# --- after a supervisor died ------------------------------------------------------------------
#
# A queue worker or `runjob` killed with SIGKILL (or a reboot) cannot record
# its run's end: the run stays "running" with a supervisor that is gone. Its
# stage runs in its own session, so it survives the kill and goes on
# training. A new supervisor (a queue worker as it starts, or before its next
# task; `runjob --resume`) then either adopts the run, when the stage's
# process is still the one that was started (pid *and* start time, so a
# reused pid never counts) or ended with stage_end "done", or else marks it
# failed (interrupted, resumable from its last checkpoint): see
# studio.actions.adopt_run and reap_orphaned_runs.


def supervisor_gone(run: Run) -> bool:
    """Is the run's supervisor process gone? Only answerable on its own host (runs may share a database across nodes)."""
    if not run.supervisor_pid or run.supervisor_host != socket.gethostname():
        return False
    if run.supervisor_token:
        return not token_alive(run.supervisor_token)
    return not pid_alive(run.supervisor_pid)


def orphaned_runs() -> list[Run]:
    """Runs marked running on this host whose supervisor process is gone, oldest first."""
    runs = Run.objects.filter(status=Run.Status.RUNNING, supervisor_host=socket.gethostname()).order_by("created_at")
    return [run for run in runs if supervisor_gone(run)]


def adoptable_stage(run: Run) -> StageRun | None:
    """The stage a new supervisor can follow for an orphaned run, or None.

    Its process must still be the very one that was started (token: boot id,
    pid and start time), or it must have ended with stage_end "done" (its
    work is kept and the run goes on). A run orphaned between stages, a stage
    recorded without a token, or one that died any other way is not
    adoptable: it is reaped.
    """
    stage = run.stages.filter(status=StageRun.Status.RUNNING).order_by("order").first()
    if stage is None or not stage.pid or not stage.token or token_pid(stage.token) != stage.pid:
        return None
    if process_running(stage.token):
        return stage
    # It ended while nobody watched (a zombie of ours counts as ended).
    end = _attempt_end(run, stage)
    return stage if end and end.get("status") == "done" else None


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
                and ingest.finite(event.get("time")) and event["time"] >= since):
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
        return END_STATUS_CODES.get(end.get("status")) if end else None
