"""The real queue: a run enqueued on django-q2's ORM broker is executed by `manage.py qcluster`."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

ENQUEUE = (
    "from studio import actions; "
    "run = actions.create_run('tiny', {'stages': 'tok_train', 'tok_max_chars': '200000'}); "
    "actions.enqueue_run(run); print(run.id)"
)


@pytest.mark.slow
def test_qcluster_executes_a_queued_run(manage_env):
    from tests.helpers import mirror

    manage_env["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    run = lambda *args: subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=manage_env,  # noqa: E731
                                       capture_output=True, text=True, timeout=120, check=True)
    run("migrate", "--noinput")
    run_id = run("shell", "-c", ENQUEUE).stdout.strip().splitlines()[-1]
    db = sqlite3.connect(manage_env["DATABASE_URL"].removeprefix("sqlite:///"), timeout=20)
    assert db.execute("SELECT count(*) FROM django_q_ormq").fetchone() == (1,)

    cluster = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=REPO, env=manage_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline:
            (status,) = db.execute("SELECT status FROM studio_run WHERE id = ?", (run_id,)).fetchone()
            if status in ("done", "failed", "cancelled") and db.execute("SELECT count(*) FROM django_q_task").fetchone()[0]:
                break
            assert cluster.poll() is None, cluster.stdout.read().decode()
            time.sleep(0.5)
    finally:
        # Only the main process: a SIGTERM to the whole group kills the sentinel
        # while it may hold a shared lock, and the main process then hangs.
        os.kill(cluster.pid, signal.SIGTERM)
        try:
            output = cluster.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, signal.SIGKILL)
            output = cluster.communicate()[0].decode()
    assert status == "done", output[-3000:]
    assert "Retry and timeout are misconfigured" not in output
    stage = db.execute("SELECT status, exit_code, pid FROM studio_stagerun WHERE run_id = ?", (run_id,)).fetchone()
    assert stage[:2] == ("done", 0)
    assert db.execute("SELECT success FROM django_q_task").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM django_q_ormq").fetchone() == (0,)  # acknowledged, never redelivered
    assert db.execute("SELECT count(*) FROM studio_runevent WHERE run_id = ? AND kind = 'stage_end'", (run_id,)).fetchone() == (1,)
    run_dir = Path(manage_env["NANOSTUDIO_RUNS_DIR"]) / run_id
    assert (run_dir / "tokenizer" / "tokenizer.json").exists()
