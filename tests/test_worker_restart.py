"""After a worker restart: queued runs start, orphaned runs are adopted or marked, nothing runs twice.

The end-to-end tests kill -9 a real `manage.py qcluster` (its whole process
group) while a run trains and two more wait, restart it, and watch what the
new cluster does, with quick fake stages; the others test the decisions in
this process.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.utils import timezone

from studio import actions, ingest, leases, processes, supervisor, tasks
from studio.models import GpuLease, Run, StageRun
from tests.helpers import REPO
from tests.servers import redis_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

TOK_AND_BASE = {"stages": "tok_train,base_train"}

# A stage command: appends its pid to <run>/<stage>.starts (how many times it
# ran), then writes metric steps 0, 1, 2, ... every STEP seconds; it ends
# (stage_end done, exit 0) after `steps` steps, or with steps=0 three steps
# after the file named by $FAKE_RELEASE exists. "hang" writes one step and sleeps.
STAGE = r'''
import os, sys, time
from pipeline.events import EventWriter

run_dir, stage, mode = sys.argv[1:4]
with open(os.path.join(run_dir, stage + ".starts"), "a") as f:
    f.write(f"{os.getpid()}\n")
events = EventWriter(run_dir, stage)
events.start()
print(f"{stage}: fake stage ({mode}) pid {os.getpid()}", flush=True)
if mode == "hang":
    events.metric(step=0, note="waiting")
    time.sleep(300)
steps = int(mode)
release = os.environ.get("FAKE_RELEASE", "")
step, left = 0, steps or None
while left is None or left > 0:
    events.metric(step=step, loss=1.0 / (step + 1))
    step += 1
    if left is not None:
        left -= 1
    elif step >= 3 and os.path.exists(release):
        left = 3
    time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.05")))
events.end(status="done", steps=step)
'''


@pytest.fixture
def stage_script(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(STAGE)
    return path


@pytest.fixture
def quick_stages(monkeypatch, stage_script, settings):
    """Every stage runs STAGE with `modes[stage]` (default: 3 steps)."""
    from pipeline import config

    modes: dict[str, str] = {}

    def stage_commands(cfg, run_dir, python=None):
        return [config.StageCommand(name, [sys.executable, str(stage_script), str(run_dir), name, modes.get(name, "3")],
                                    env={"PYTHONPATH": str(REPO)}) for name in cfg["stages"]]

    monkeypatch.setattr(config, "stage_commands", stage_commands)
    settings.NANOSTUDIO_CANCEL_GRACE = 2.0
    return modes


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_stage(run, stage_script, stage="tok_train", mode="20", step_seconds=0.05) -> tuple[subprocess.Popen, dt.datetime]:
    """Start a stage the way a supervisor does (own session, log file), as the one that then died."""
    started = timezone.now()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_STEP_SECONDS": str(step_seconds)}
    with open(run.run_dir / "logs" / f"{stage}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(stage_script), str(run.run_dir), stage, mode],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, started


def metric_lines(run) -> int:
    path = run.run_dir / "events.jsonl"
    return path.read_text().count('"kind":"metric"') if path.exists() else 0


def orphan(run, proc_pid: int, started, stage="tok_train", token: str | None = None) -> int:
    """Mark `run` as running `stage` (pid `proc_pid`) under a supervisor that is gone; return its pid."""
    dead = dead_pid()
    boot = processes.process_token().split(":")[0]
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=started, supervisor_pid=dead,
                                         supervisor_host=socket.gethostname(), supervisor_token=f"{boot}:{dead}:1")
    run.stages.filter(name=stage).update(status=StageRun.Status.RUNNING, pid=proc_pid, started_at=started,
                                         token=processes.process_token(proc_pid) if token is None else token)
    return dead


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def metric_steps(run, stage="tok_train") -> list[int]:
    return list(run.events.filter(stage=stage, kind="metric").order_by("seq").values_list("step", flat=True))


def starts(run, stage) -> int:
    path = Path(run.run_dir) / f"{stage}.starts"
    return len(path.read_text().split()) if path.exists() else 0


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


# --- adoption --------------------------------------------------------------------------------


def test_a_starting_worker_adopts_a_stage_that_still_runs_and_finishes_the_run(runs_dir, quick_stages, stage_script):
    run = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(run, stage_script, mode="20", step_seconds=0.1)
    try:
        dead = orphan(run, proc.pid, started)
        wait_for(lambda: metric_lines(run) >= 3, what="a few steps")
        ingest.ingest_events(run)  # what the supervisor stored before it was killed
        stored = run.events.count()
        assert stored >= 3 and proc.poll() is None

        tasks.on_worker_start(sender="django_q", proc_name="Process-1")  # what a new worker does first

        run.refresh_from_db()
        assert run.status == Run.Status.DONE, run.error
        assert run.supervisor_pid == os.getpid() and run.supervisor_token == processes.process_token()
        tok = run.stages.get(name="tok_train")
        assert tok.status == StageRun.Status.DONE and tok.exit_code is None  # not our child: no exit code
        assert metric_steps(run) == list(range(20))  # followed from where the dead one left: none missing, none twice
        assert run.events_seq == run.events.count() > stored
        log = tok.log_tail(5)
        assert any(f"the previous one (pid {dead}) stopped" in line for line in log)
        assert any("stage_end event says 'done'" in line for line in log)
        # The rest of the pipeline ran, once.
        assert run.stages.get(name="base_train").status == StageRun.Status.DONE
        assert starts(run, "tok_train") == 1 and starts(run, "base_train") == 1
    finally:
        proc.kill()
        proc.wait()


def test_an_adopted_stage_obeys_cancel_through_signals_to_its_group(runs_dir, quick_stages, stage_script):
    run = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(run, stage_script, mode="hang")
    try:
        orphan(run, proc.pid, started)

        def cancel_on_first_metric(event):
            if event.get("kind") == "metric":
                actions.cancel_run(Run.objects.get(pk=run.pk))

        run = actions.adopt_run(run, on_event=cancel_on_first_metric)
        assert run.status == Run.Status.CANCELLED and run.error == "cancelled during tok_train"
        assert run.stages.get(name="tok_train").status == StageRun.Status.CANCELLED
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert run.stages.get(name="base_train").status == StageRun.Status.CANCELLED
    finally:
        proc.kill()
        proc.wait()


def test_an_adopted_stage_that_dies_without_stage_end_fails_the_run_resumably(runs_dir, quick_stages, stage_script):
    run = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(run, stage_script, mode="hang")
    try:
        orphan(run, proc.pid, started)

        def kill_it(event):  # as if the OOM killer took it
            if event.get("kind") == "metric":
                os.killpg(proc.pid, signal.SIGKILL)

        run = actions.adopt_run(run, on_event=kill_it)
        assert run.status == Run.Status.FAILED and run.is_resumable
        assert "without a stage_end event" in run.error and "exit code is unknown" in run.error
        assert run.stages.get(name="base_train").status == StageRun.Status.SKIPPED
    finally:
        proc.kill()
        proc.wait()


def test_a_stage_that_finished_while_unsupervised_is_kept_and_the_run_goes_on(runs_dir, quick_stages, stage_script):
    run = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(run, stage_script, mode="3")
    orphan(run, proc.pid, started)
    proc.wait()  # it ended while nobody watched; its pid may even be reused now
    tasks.on_worker_start(sender="django_q", proc_name="Process-1")
    run.refresh_from_db()
    assert run.status == Run.Status.DONE, run.error
    assert metric_steps(run) == [0, 1, 2] and starts(run, "tok_train") == 1 and starts(run, "base_train") == 1


def test_a_stage_that_died_while_unsupervised_marks_the_run_interrupted(runs_dir, quick_stages, stage_script):
    run = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(run, stage_script, mode="hang")
    orphan(run, proc.pid, started)
    wait_for(lambda: (run.run_dir / "events.jsonl").exists(), what="the stage to start")
    proc.kill()
    proc.wait()
    tasks.on_worker_start(sender="django_q", proc_name="Process-1")
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "interrupted" in run.error and "resume it" in run.error
    assert list(run.stages.values_list("status", flat=True)) == ["failed", "skipped"]
    assert starts(run, "base_train") == 0


def test_a_reused_pid_is_never_adopted_nor_signalled(runs_dir, quick_stages):
    run = actions.create_run("tiny", TOK_AND_BASE)
    # A live process in its own session has the stage's pid, but not its start time: someone else's.
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        boot, pid, start = processes.process_token(stranger.pid).rsplit(":", 2)
        orphan(run, stranger.pid, timezone.now(), token=f"{boot}:{pid}:{int(start) - 100}")
        assert supervisor.adoptable_stage(run) is None
        tasks.on_worker_start(sender="django_q", proc_name="Process-1")
        run.refresh_from_db()
        assert run.status == Run.Status.FAILED and "interrupted" in run.error
        time.sleep(0.2)
        assert stranger.poll() is None  # not signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_only_one_supervisor_adopts_a_run(runs_dir, quick_stages, stage_script, monkeypatch):
    run = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(run, stage_script, mode="hang")
    try:
        orphan(run, proc.pid, started)
        checked = supervisor.adoptable_stage

        def another_worker_claims_it_meanwhile(r):
            stage = checked(r)
            Run.objects.filter(pk=r.pk).update(supervisor_pid=os.getppid(), supervisor_token=processes.process_token(os.getppid()))
            return stage

        monkeypatch.setattr(supervisor, "adoptable_stage", another_worker_claims_it_meanwhile)
        with pytest.raises(actions.RunNotOrphaned, match="taken over by another supervisor"):
            actions.adopt_run(run)
        run.refresh_from_db()
        assert run.status == Run.Status.RUNNING and run.supervisor_pid == os.getppid()
        assert proc.poll() is None  # left to the one that won
    finally:
        proc.kill()
        proc.wait()


def test_gpus_of_an_orphaned_stage_stay_leased_until_it_is_adopted(runs_dir, stage_script, monkeypatch):
    monkeypatch.setenv("NANOSTUDIO_GPUS", "1")
    leases.host_gpu_count.cache_clear()
    try:
        run = actions.create_run("tiny", TOK_AND_BASE)
        other = actions.create_run("tiny", TOK_AND_BASE)
        proc, started = start_stage(run, stage_script, stage="base_train", mode="hang")
        try:
            dead = orphan(run, proc.pid, started, stage="base_train")
            GpuLease.objects.create(host=socket.gethostname(), index=0, run=run, stage="base_train",
                                    holder_token=f"{processes.process_token().split(':')[0]}:{dead}:1")
            polls = []
            assert leases.lease_gpus(other, other.stages.get(name="base_train"), 1,
                                      stop_check=lambda: polls.append(1) or len(polls) > 2) is None  # still busy
            proc.kill()
            proc.wait()
            assert leases.lease_gpus(other, other.stages.get(name="base_train"), 1) == [0]  # free once it ended
        finally:
            proc.kill()
            proc.wait()
    finally:
        leases.host_gpu_count.cache_clear()


def test_runjob_resume_takes_over_a_run_whose_supervisor_was_killed(runs_dir, quick_stages, stage_script):
    from io import StringIO

    from django.core.management import call_command

    run = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(run, stage_script, mode="10")
    try:
        orphan(run, proc.pid, started)
        call_command("runjob", "--resume", run.id, stdout=StringIO())  # raises CommandError unless it ends done
        run.refresh_from_db()
        assert run.status == Run.Status.DONE and metric_steps(run) == list(range(10))
        assert starts(run, "tok_train") == 1 and starts(run, "base_train") == 1
    finally:
        proc.kill()
        proc.wait()


def test_runjob_leaves_an_adoptable_orphan_running(runs_dir, quick_stages, stage_script):
    from io import StringIO

    from django.core.management import call_command

    orphaned = actions.create_run("tiny", TOK_AND_BASE)
    proc, started = start_stage(orphaned, stage_script, mode="hang")
    try:
        orphan(orphaned, proc.pid, started)
        call_command("runjob", "tiny", "--set", "stages=tok_train", stdout=StringIO())  # another run, in the foreground
        orphaned.refresh_from_db()
        assert orphaned.status == Run.Status.RUNNING and proc.poll() is None  # for a worker to adopt
    finally:
        proc.kill()
        proc.wait()


# --- queued runs after a restart -------------------------------------------------------------


def _orm_task(run):
    from django_q.models import OrmQ

    return [row for row in OrmQ.objects.all() if row.task["args"] == (run.id,)]


def test_requeue_replaces_tasks_a_dead_cluster_took_and_only_those(runs_dir, settings):
    from django_q.models import OrmQ

    retry = dt.timedelta(seconds=settings.Q_CLUSTER["retry"])
    cluster_started = timezone.now() - dt.timedelta(seconds=5)
    runs = {name: actions.create_run("tiny", TOK_AND_BASE, name=name)
            for name in ("taken_by_dead", "taken_by_us", "waiting", "never_enqueued", "just_created", "running")}
    for name in ("taken_by_dead", "taken_by_us", "waiting", "running"):
        actions.enqueue_run(runs[name])
    lock = {"taken_by_dead": cluster_started - dt.timedelta(seconds=20) + retry,  # taken 20 s before we started
            "taken_by_us": cluster_started + dt.timedelta(seconds=1) + retry,
            "running": cluster_started - dt.timedelta(seconds=20) + retry}
    for name, until in lock.items():
        OrmQ.objects.filter(pk=_orm_task(runs[name])[0].pk).update(lock=until)
    Run.objects.filter(pk=runs["running"].pk).update(status=Run.Status.RUNNING)
    Run.objects.filter(pk=runs["never_enqueued"].pk).update(queued_at=cluster_started - dt.timedelta(minutes=5))
    Run.objects.filter(pk=runs["taken_by_dead"].pk).update(queued_at=cluster_started - dt.timedelta(seconds=21))
    before = {name: [row.pk for row in _orm_task(run)] for name, run in runs.items()}

    requeued = tasks.requeue_stranded_runs(cluster_started)

    assert sorted(requeued) == sorted([runs["taken_by_dead"].id, runs["never_enqueued"].id])
    after = {name: _orm_task(run) for name, run in runs.items()}
    # The dead cluster's task is gone, a new one is ready to be taken now.
    assert len(after["taken_by_dead"]) == 1 and after["taken_by_dead"][0].pk not in before["taken_by_dead"]
    assert after["taken_by_dead"][0].lock <= timezone.now()
    assert len(after["never_enqueued"]) == 1
    # Ours and the waiting one are left as they are; a just-created run's enqueue is on its way.
    for name in ("taken_by_us", "waiting"):
        assert [row.pk for row in after[name]] == before[name]
    assert after["just_created"] == []
    assert after["running"] == []  # a dead cluster's task of a run that is not queued is just removed

    # A second worker of the cluster starting (or this one restarting) adds nothing: no pile of duplicates.
    assert tasks.requeue_stranded_runs(cluster_started) == []
    assert OrmQ.objects.count() == 4


def test_a_queued_run_without_a_task_for_a_while_is_enqueued_at_worker_start(runs_dir):
    run = actions.create_run("tiny", TOK_AND_BASE)  # as if the web process crashed before enqueue_run
    assert _orm_task(run) == []
    tasks.on_worker_start(sender="django_q", proc_name="Process-1")
    assert _orm_task(run) == []  # too recent to tell from a create that is about to enqueue
    Run.objects.filter(pk=run.pk).update(queued_at=timezone.now() - dt.timedelta(minutes=1))
    tasks.on_worker_start(sender="django_q", proc_name="Process-1")
    assert len(_orm_task(run)) == 1
    tasks.on_worker_start(sender="django_q", proc_name="Process-2")
    assert len(_orm_task(run)) == 1


def test_two_deliveries_of_a_task_execute_the_run_once(runs_dir, quick_stages):
    run = actions.create_run("tiny", TOK_AND_BASE)
    assert tasks.run_pipeline(run.id) == Run.Status.DONE
    assert tasks.run_pipeline(run.id) == Run.Status.DONE  # the duplicate finds it done
    assert starts(run, "tok_train") == 1 and starts(run, "base_train") == 1


def test_a_duplicate_delivered_while_the_run_executes_does_nothing(runs_dir, quick_stages):
    run = actions.create_run("tiny", TOK_AND_BASE)
    seen = []

    def deliver_again(event):
        if not seen:
            seen.append(tasks.run_pipeline(run.id))

    actions.execute_run(run, on_event=deliver_again)
    assert seen == [Run.Status.RUNNING]
    assert starts(run, "tok_train") == 1 and starts(run, "base_train") == 1


def test_redis_broker_requeues_runs_whose_tasks_were_lost_once_per_cluster(runs_dir, redis_url, monkeypatch):
    """With Redis a taken task leaves the list for the cluster's memory: a killed cluster's are gone."""
    import redis as redis_lib
    from django_q.brokers import redis_broker

    class TestRedis(redis_broker.Redis):
        @staticmethod
        def get_connection(list_key=None):
            return redis_lib.from_url(redis_url)

    broker = TestRedis(list_key=f"test-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setattr("django_q.brokers.get_broker", lambda list_key=None: broker)
    monkeypatch.setattr("django_q.tasks.get_broker", lambda list_key=None: broker)
    sentinel = {"token": f"cluster-a-{time.monotonic_ns()}"}  # the marker key names the cluster's sentinel
    monkeypatch.setattr(processes, "process_token", lambda pid=None: sentinel["token"])
    try:
        started = timezone.now()
        lost, waiting = (actions.create_run("tiny", TOK_AND_BASE, name=n) for n in ("lost", "waiting"))
        Run.objects.filter(pk__in=[lost.pk, waiting.pk]).update(queued_at=started - dt.timedelta(seconds=10))
        actions.enqueue_run(waiting)
        assert broker.queue_size() == 1

        assert tasks.requeue_stranded_runs(started) == [lost.id]
        assert broker.queue_size() == 2
        # Later workers of the same cluster hold back: its pusher may hold tasks in memory by then.
        broker.connection.delete(broker.list_key)
        assert tasks.requeue_stranded_runs(started) == []
        # A new cluster after a kill -9 that lost both: both are enqueued again, once.
        sentinel["token"] = f"cluster-b-{time.monotonic_ns()}"
        later = timezone.now() + dt.timedelta(seconds=3)
        assert tasks.requeue_stranded_runs(later) == [lost.id, waiting.id]
        assert tasks.requeue_stranded_runs(later) == []
        assert broker.queue_size() == 2
    finally:
        broker.connection.delete(broker.list_key)


# --- end to end: kill -9 a real qcluster and start it again ----------------------------------

LAUNCHER = r'''
"""manage.py with every stage replaced by the fake STAGE (mode 0: runs until $FAKE_RELEASE exists)."""
import os, sys

sys.path.insert(0, os.environ["REPO"])
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nanostudio.settings")
import django

django.setup()
from pipeline import config


def stage_commands(cfg, run_dir, python=None):
    return [config.StageCommand(name, [sys.executable, os.environ["FAKE_STAGE"], str(run_dir), name, "0"],
                                env={"PYTHONPATH": os.environ["REPO"]}) for name in cfg["stages"]]


config.stage_commands = stage_commands
from django.core.management import execute_from_command_line

execute_from_command_line(["manage.py", *sys.argv[1:]])
'''

CREATE_THREE = (
    "from studio import actions\n"
    "for name in ('first', 'second', 'third'):\n"
    "    run = actions.create_run('tiny', {'stages': 'tok_train,base_train'}, name=name)\n"
    "    actions.enqueue_run(run)\n"
    "    print('RUN', run.id)\n"
)


class Cluster:
    """`manage.py qcluster` (through LAUNCHER) as its own process group."""

    def __init__(self, launcher, env, log):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(launcher), "qcluster"], cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def kill9(self) -> None:
        """SIGKILL every process of the cluster at once: main, sentinel, pusher, monitor, workers."""
        from tests.servers import group_alive

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        wait_for(lambda: not group_alive(self.proc.pid), what="the killed cluster's processes to go")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)  # only the main process: it stops the others in order
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _db_rows(db, sql, *args):
    for _ in range(50):
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # locked by the cluster for a moment
            time.sleep(0.1)
    return db.execute(sql, args).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("broker, stage_survives", [("orm", True), ("redis", True), ("orm", False)],
                         ids=["orm", "redis", "orm-stage-killed-too"])
def test_after_kill_9_and_restart_the_running_run_is_adopted_and_the_queued_ones_run_once(
        broker, stage_survives, manage_env, tmp_path, stage_script, request):
    """kill -9 the cluster while one run trains and two wait; restart it.

    The stage survives (own session) and the new worker adopts its run, or,
    when the stage died too, marks the run interrupted; either way both queued
    runs start within a minute, and nothing runs twice.
    """
    from tests.servers import kill_marked, tail

    env = {**manage_env, "REPO": str(REPO), "FAKE_STAGE": str(stage_script), "FAKE_RELEASE": str(tmp_path / "release"),
           "FAKE_STEP_SECONDS": "0.2", "NANOSTUDIO_GPUS": "0", "NANOSTUDIO_TEST_SERVER": f"restart-{os.getpid()}-{broker}"}
    redis_client = None
    if broker == "redis":
        import redis as redis_lib

        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/7"  # a database of its own
        env["REDIS_URL"] = url
        redis_client = redis_lib.from_url(url)
        redis_client.flushdb()
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)

    def manage(*args):
        return subprocess.run([sys.executable, str(launcher), *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180, check=True).stdout

    manage("migrate", "--noinput")
    logs = [tmp_path / "qcluster-1.log", tmp_path / "qcluster-2.log"]
    runs_dir = Path(env["NANOSTUDIO_RUNS_DIR"])
    clusters, db = [], None
    try:
        # The worker is up before the runs are submitted, as in daily use. (Runs queued before a
        # cluster starts are its startup check's business: with Redis, one its pusher took at
        # once would be delivered twice, harmlessly, and the list below would never be empty.)
        clusters.append(Cluster(launcher, env, logs[0]))
        wait_for(lambda: b"running." in logs[0].read_bytes(), 60, "the first cluster to start")
        first, second, third = [line.split()[1] for line in manage("shell", "-c", CREATE_THREE).splitlines()
                                if line.startswith("RUN ")]
        db = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///"), timeout=20)
        status = lambda run_id: _db_rows(db, "SELECT status FROM studio_run WHERE id = ?", run_id)[0][0]  # noqa: E731

        def all_taken():
            # The trap: one worker, yet all three tasks have left the queue for the cluster (one runs,
            # one waits in its task queue, one in its pusher). With the ORM broker they are locked for
            # `retry` seconds (a week); with Redis they only exist in the cluster's memory.
            trained = _db_rows(db, "SELECT count(*) FROM studio_runevent WHERE run_id = ? AND kind = 'metric'", first)
            if status(first) != "running" or trained[0][0] < 2:
                return False
            if broker == "redis":
                return redis_client.llen("django_q:nanostudio:q") == 0
            locks = [dt.datetime.fromisoformat(lock) for (lock,) in _db_rows(db, "SELECT lock FROM django_q_ormq")]
            now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            return len(locks) == 3 and all(lock > now + dt.timedelta(days=1) for lock in locks)

        wait_for(all_taken, 60, "the first run to train and the cluster to take all three tasks")
        [(stage_pid, old_supervisor)] = _db_rows(
            db, "SELECT s.pid, r.supervisor_pid FROM studio_stagerun s JOIN studio_run r ON r.id = s.run_id "
                "WHERE s.run_id = ? AND s.name = 'tok_train'", first)

        clusters[0].kill9()
        assert running(stage_pid), "the stage runs in its own session: a kill -9 of the cluster spares it"
        assert status(first) == "running" and status(second) == status(third) == "queued"
        if not stage_survives:  # e.g. the OOM killer took both
            os.killpg(stage_pid, signal.SIGKILL)
            wait_for(lambda: not running(stage_pid), what="the stage to die")

        restarted = time.monotonic()
        clusters.append(Cluster(launcher, env, logs[1]))

        if stage_survives:
            def adopted():
                [(pid,)] = _db_rows(db, "SELECT supervisor_pid FROM studio_run WHERE id = ?", first)
                return pid != old_supervisor and running(pid) and status(first) == "running"

            wait_for(adopted, 60, "the new worker to adopt the first run")
            assert running(stage_pid)  # followed, not stopped
        else:
            wait_for(lambda: status(first) == "failed", 60, "the first run to be marked interrupted")
            [(error,)] = _db_rows(db, "SELECT error FROM studio_run WHERE id = ?", first)
            assert "interrupted" in error and "resume it" in error
        (tmp_path / "release").touch()  # let the stages finish

        for run_id in (second, third):
            wait_for(lambda: status(run_id) in ("running", "done"), 60 - (time.monotonic() - restarted),
                     f"queued run {run_id} to start within a minute of the restart")
        for run_id in (first, second, third) if stage_survives else (second, third):
            wait_for(lambda: status(run_id) in ("done", "failed", "cancelled"), 60, f"run {run_id} to end")
            assert status(run_id) == "done", _db_rows(db, "SELECT error FROM studio_run WHERE id = ?", run_id)

        if stage_survives:
            # The adopted stage: no exit code (not the new worker's child), every step stored once, in order.
            [(exit_code,)] = _db_rows(db, "SELECT exit_code FROM studio_stagerun WHERE run_id = ? AND name = 'tok_train'",
                                      first)
            assert exit_code is None
            steps = [s for (s,) in _db_rows(db, "SELECT step FROM studio_runevent WHERE run_id = ? "
                                                "AND stage = 'tok_train' AND kind = 'metric' ORDER BY seq", first)]
            assert steps == list(range(len(steps))) and len(steps) > 3
            assert "adopted by the supervisor" in (runs_dir / first / "logs" / "tok_train.log").read_text()
        # No run and no stage ran twice.
        for run_id in (first, second, third):
            for stage in ("tok_train", "base_train"):
                path = runs_dir / run_id / f"{stage}.starts"
                ran = path.read_text().split() if path.exists() else []
                expected = 0 if (run_id == first and stage == "base_train" and not stage_survives) else 1
                assert len(ran) == expected, f"{run_id}/{stage} started {len(ran)} times"
        if broker == "orm":
            # The dead cluster's locked tasks were replaced, and every task was acknowledged.
            wait_for(lambda: _db_rows(db, "SELECT count(*) FROM django_q_ormq")[0][0] == 0, 30, "an empty queue")
    except BaseException:
        for path in [*logs, *sorted(runs_dir.glob("*/logs/*.log"))]:
            print(f"\n----- {path} -----\n{tail(path, 40)}")
        raise
    finally:
        for cluster in clusters:
            cluster.stop()
        kill_marked("NANOSTUDIO_TEST_SERVER", env["NANOSTUDIO_TEST_SERVER"])
        if db is not None:
            db.close()


@pytest.mark.slow
def test_with_two_workers_each_adopts_one_run_and_the_third_runs_once(manage_env, tmp_path, stage_script):
    """Two workers start at once after a kill -9: they race for the same runs and tasks; each run runs once."""
    from tests.servers import kill_marked, tail

    env = {**manage_env, "REPO": str(REPO), "FAKE_STAGE": str(stage_script), "FAKE_RELEASE": str(tmp_path / "release"),
           "FAKE_STEP_SECONDS": "0.2", "NANOSTUDIO_GPUS": "0", "NANOSTUDIO_Q_WORKERS": "2",
           "NANOSTUDIO_TEST_SERVER": f"restart-{os.getpid()}-two-workers"}
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)

    def manage(*args):
        return subprocess.run([sys.executable, str(launcher), *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180, check=True).stdout

    manage("migrate", "--noinput")
    ids = [line.split()[1] for line in manage("shell", "-c", CREATE_THREE).splitlines() if line.startswith("RUN ")]
    db = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///"), timeout=20)
    runs_dir = Path(env["NANOSTUDIO_RUNS_DIR"])
    status = lambda run_id: _db_rows(db, "SELECT status FROM studio_run WHERE id = ?", run_id)[0][0]  # noqa: E731
    logs = [tmp_path / "qcluster-1.log", tmp_path / "qcluster-2.log"]
    clusters = [Cluster(launcher, env, logs[0])]
    try:
        def two_training():
            pids = _db_rows(db, "SELECT pid FROM studio_stagerun WHERE name = 'tok_train' AND status = 'running'")
            trained = _db_rows(db, "SELECT count(DISTINCT run_id) FROM studio_runevent WHERE kind = 'metric'")[0][0]
            return [pid for (pid,) in pids] if len(pids) == 2 and trained == 2 else None

        stage_pids = wait_for(two_training, 60, "two runs to train at once")
        clusters[0].kill9()
        assert all(running(pid) for pid in stage_pids)
        clusters.append(Cluster(launcher, env, logs[1]))

        def adopted_by_two_workers():
            supervisors = [pid for (pid,) in _db_rows(db, "SELECT supervisor_pid FROM studio_run WHERE status = 'running'")]
            return len(supervisors) == 2 == len(set(supervisors)) and all(running(pid) for pid in supervisors)

        wait_for(adopted_by_two_workers, 60, "each new worker to adopt one of the two runs")
        (tmp_path / "release").touch()
        for run_id in ids:
            wait_for(lambda: status(run_id) in ("done", "failed", "cancelled"), 60, f"run {run_id} to end")
            assert status(run_id) == "done", _db_rows(db, "SELECT error FROM studio_run WHERE id = ?", run_id)
        for run_id in ids:
            for stage in ("tok_train", "base_train"):
                ran = (runs_dir / run_id / f"{stage}.starts").read_text().split()
                assert len(ran) == 1, f"{run_id}/{stage} started {len(ran)} times"
        wait_for(lambda: _db_rows(db, "SELECT count(*) FROM django_q_ormq")[0][0] == 0, 30, "an empty queue")
        # The third run's task was replaced once, not once per worker.
        assert tail(logs[1], 200).count("enqueued it again") == 1
    except BaseException:
        for path in [*logs, *sorted(runs_dir.glob("*/logs/*.log"))]:
            print(f"\n----- {path} -----\n{tail(path, 40)}")
        raise
    finally:
        for cluster in clusters:
            cluster.stop()
        kill_marked("NANOSTUDIO_TEST_SERVER", env["NANOSTUDIO_TEST_SERVER"])
        db.close()
