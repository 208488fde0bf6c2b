"""Functions the django-q2 cluster runs (`python manage.py qcluster`).

One task is one whole pipeline (see Q_CLUSTER in settings for why its
timeout and retry cannot hand a running pipeline to a second worker).

Stopping the cluster: `qcluster` stops gracefully on SIGTERM/Ctrl-C to its
main process, which means it waits for the running pipeline to finish. To
stop sooner, cancel the run in the studio (its stages get SIGTERM, then
SIGKILL), or send SIGTERM to the worker process itself (Run.supervisor_pid):
the stage's process group is killed and the run is marked failed.

Restarting after a crash (kill -9, OOM, reboot): each worker, as it starts
(on_worker_start),
  1. enqueues again the queued runs whose task no live worker will deliver:
     tasks the dead cluster had taken (with the ORM broker they stay locked
     for `retry` seconds, about a week; with Redis they were in its memory)
     and runs that were never enqueued (a crash between create and enqueue);
  2. marks runs whose supervisor died and whose stage died too as failed
     (interrupted, resumable from their last checkpoint);
  3. adopts runs whose supervisor died while their stage still runs (the
     stage is in its own session, so it survives): it follows the stage to
     its end and runs the remaining stages, then takes tasks as usual.
Steps 2 and 3 also run before each task, for supervisors (e.g. `runjob`)
that died while the worker was up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import threading

from django.db import DatabaseError
from django.utils import timezone

from studio import actions, processes
from studio.models import Run

log = logging.getLogger(__name__)

PIPELINE = "studio.tasks.run_pipeline"
# A queued run without a task is left alone this long: its enqueue (a web
# request between create_run and enqueue_run) or its claim (`runjob`) is on
# its way.
REQUEUE_GRACE_SECONDS = 30.0


class WorkerStopped(Exception):
    """The queue worker received SIGTERM (qcluster shutting down) mid-run."""


def run_pipeline(run_id: str) -> str:
    """Execute a queued run's stages; return the run's final status.

    Safe to deliver twice: a run that is no longer queued is left alone.
    """
    with _sigterm_raises(WorkerStopped):
        _recover_orphans()
        run = Run.objects.get(pk=run_id)
        if run.status != Run.Status.QUEUED:
            log.info("run %s is %s; nothing to do (a task delivered after its run started or ended, e.g. one "
                     "enqueued again after a worker restart: harmless)", run.id, run.status)
            return run.status
        try:
            run = actions.execute_run(run)
        except actions.RunNotQueued as e:
            log.info("%s; nothing to do (another delivery of its task started it first)", e)
            return Run.objects.get(pk=run_id).status
    return run.status


def on_worker_start(sender=None, proc_name=None, **kwargs) -> None:
    """django-q2's post_spawn: recover what a cluster that stopped abruptly left behind (see the module doc).

    Runs in the new worker before it takes its first task; adopting a run
    keeps it here until that run ends, as executing its task would have.
    """
    try:
        requeue_stranded_runs(cluster_started_at())
    except Exception:  # e.g. migrations not applied yet, the broker down: the worker must still start
        log.exception("could not check for queued runs to enqueue again")
    with _sigterm_raises(WorkerStopped):
        _recover_orphans()


def _recover_orphans() -> None:
    """Reap this host's runs whose supervisor and stage died; adopt those whose stage still runs.

    Never raises (but WorkerStopped): the worker must go on to its tasks.
    """
    # Reap first: a run whose stage died must not wait behind an adopted one.
    try:
        for run in actions.reap_orphaned_runs(keep_adoptable=True):
            log.warning("run %s was interrupted; marked failed (resumable)", run.id)
    except DatabaseError as e:  # e.g. migrations not applied yet: the next task checks again
        log.warning("could not check for interrupted runs: %s", e)
        return
    try:
        for run in actions.adopt_orphaned_runs():
            log.warning("adopted run %s ended: %s", run.id, run.status)
    except WorkerStopped:
        raise
    except Exception:  # the adopted run is marked failed already (execute_run's bookkeeping)
        log.exception("adopting an interrupted run failed")


def cluster_started_at() -> dt.datetime:
    """When the cluster of this worker started (its sentinel, the worker's parent process)."""
    started = processes.process_started_at(os.getppid())
    return dt.datetime.fromtimestamp(started, tz=dt.timezone.utc) if started else timezone.now()


def requeue_stranded_runs(cluster_started_at: dt.datetime) -> list[str]:
    """Enqueue again every queued run that no live worker is going to deliver; return their ids.

    A run counts as delivered in time when the broker holds its task ready to
    take, or (ORM broker) locked by a cluster that started no earlier than
    this one, i.e. this very cluster. A task locked since before this cluster
    started was taken by a cluster that is gone: it is deleted and the run
    enqueued again. A queued run without any task is enqueued again when it
    was queued before this cluster started or more than REQUEUE_GRACE_SECONDS
    ago. Runs are enqueued once however many workers start at once (each
    re-enqueue is a conditional UPDATE of Run.queued_at), and a task that is
    delivered twice anyway starts its run once (execute_run's claim).
    """
    from django_q.brokers import get_broker
    from django_q.brokers.orm import ORM

    broker = get_broker()
    now = timezone.now()
    if isinstance(broker, ORM):
        covered, freed = _orm_tasks(broker, cluster_started_at)
    elif _is_redis(broker):
        # Taken tasks leave Redis for the cluster's memory: what is not in the
        # list is either lost with a dead cluster or held by this cluster's
        # pusher, which cannot be told apart. So only the first worker of a
        # cluster, as it starts, enqueues runs queued before the cluster
        # started; a task its pusher had already taken is then delivered
        # twice, and the second delivery does nothing.
        if not broker.connection.set(f"nanostudio:recovered:{processes.process_token(os.getppid())}", 1,
                                     nx=True, ex=7 * 24 * 3600):
            return []
        covered, freed = _redis_tasks(broker), {}
    else:  # another broker: its claims cannot be inspected
        return []

    requeued = []
    recent = max(now - dt.timedelta(seconds=REQUEUE_GRACE_SECONDS), cluster_started_at - dt.timedelta(seconds=2))
    for run in Run.objects.filter(status=Run.Status.QUEUED).order_by("created_at"):
        if run.id in covered:
            continue
        if run.id in freed:
            # Its task was taken by a dead cluster and deleted by us: enqueue
            # it, unless another worker has already (it bumped queued_at).
            if run.queued_at > freed[run.id]:
                continue
            why = "its task was taken by a worker that stopped before running it"
        elif run.queued_at > recent:
            continue
        else:
            why = "no worker holds a task for it"
        if not Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED, queued_at=run.queued_at).update(
                queued_at=timezone.now()):
            continue  # another worker enqueued it, or it started or was cancelled meanwhile
        task_id = actions.enqueue_run(run)
        log.warning("run %s is queued but %s: enqueued it again (task %s)", run.id, why, task_id)
        requeued.append(run.id)
    return requeued


def _is_redis(broker) -> bool:
    try:
        from django_q.brokers.redis_broker import Redis
    except ImportError:  # the `redis` package comes with the scale extra
        return False
    return isinstance(broker, Redis)


def _pipeline_run_id(task: dict) -> str | None:
    if task.get("func") != PIPELINE or not task.get("args"):
        return None
    return str(task["args"][0])


def _orm_tasks(broker, cluster_started_at) -> tuple[set[str], dict[str, dt.datetime]]:
    """(runs with a live task, {run: when we deleted its dead cluster's task})."""
    from django_q.conf import Conf
    from django_q.models import OrmQ

    queue = OrmQ.objects.using(Conf.ORM)
    retry = dt.timedelta(seconds=Conf.RETRY)
    covered, freed = set(), {}
    rows = list(queue.filter(key=broker.list_key))
    now = timezone.now()  # after reading: a task another worker enqueued a moment ago is ready, not stale
    for row in rows:
        run_id = _pipeline_run_id(row.task)
        if run_id is None:
            continue
        # The broker takes a task by moving its lock to (now + retry).
        if row.lock is not None and (row.lock <= now or row.lock - retry >= cluster_started_at):
            covered.add(run_id)  # ready to be taken, or taken by this cluster
            continue
        deleting = timezone.now()
        if queue.filter(pk=row.pk, lock=row.lock).delete()[0]:  # one worker wins
            freed.setdefault(run_id, deleting)
            log.warning("deleted the task of run %s that a stopped cluster had taken (locked until %s)",
                        run_id, row.lock)
    return covered, freed


def _redis_tasks(broker) -> set[str]:
    from django_q.signing import BadSignature, SignedPackage

    covered = set()
    for payload in broker.connection.lrange(broker.list_key, 0, -1):
        try:
            run_id = _pipeline_run_id(SignedPackage.loads(payload))
        except (BadSignature, TypeError, ValueError):
            continue
        if run_id:
            covered.add(run_id)
    return covered


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
