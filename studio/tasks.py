"""Functions the django-q2 cluster runs (`python manage.py qcluster`).

One task is one whole pipeline (see Q_CLUSTER in settings for why its
timeout and retry cannot hand a running pipeline to a second worker).

Stopping the cluster: `qcluster` stops gracefully on SIGTERM/Ctrl-C to its
main process, which means it waits for the running pipeline to finish. To
stop sooner, cancel the run in the studio (its stages get SIGTERM, then
SIGKILL), or send SIGTERM to the worker process itself (Run.supervisor_pid):
the stage's process group is killed and the run is marked failed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from studio import actions
from studio.models import Run

log = logging.getLogger(__name__)


class WorkerStopped(Exception):
    """The queue worker received SIGTERM (qcluster shutting down) mid-run."""


def run_pipeline(run_id: str) -> str:
    """Execute a queued run's stages; return the run's final status.

    Safe to deliver twice: a run that is no longer queued is left alone.
    """
    actions.reap_orphaned_runs()
    run = Run.objects.get(pk=run_id)
    if run.status != Run.Status.QUEUED:
        log.info("run %s is %s; nothing to do", run.id, run.status)
        return run.status
    try:
        with _sigterm_raises(WorkerStopped):
            run = actions.execute_run(run)
    except actions.RunNotQueued as e:
        log.info("%s", e)
        return Run.objects.get(pk=run_id).status
    return run.status


@contextlib.contextmanager
def _sigterm_raises(exc_type):
    # By default SIGTERM ends the worker on the spot and the stage's process
    # group (in its own session) would run on unsupervised. Turning it into an
    # exception lets execute_run kill the group and record the run as failed.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        # Once: a second SIGTERM (qcluster's guard terminates a worker a few
        # seconds after its timeout) must not cut short the cleanup this starts.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise exc_type("the queue worker received SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
