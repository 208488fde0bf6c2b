"""Scale mode against real servers: PostgreSQL for the database, Redis for django-q2 and Channels.

Each test gets its own database on one throwaway PostgreSQL server, and the
studio runs as it would in production: daphne and `manage.py qcluster` as
separate processes that only share the database, the broker and the runs
directory. Run with:

    .venv/bin/python -m pytest tests/test_studio_scale.py -q
"""

from __future__ import annotations

import pytest

from tests.helpers import mirror
from tests.servers import (  # noqa: F401 (postgres_url, redis_url: fixtures)
    RunSocket, StudioServer, close_code, fresh_database, pg_connect, postgres_url, redis_url,
)

pytestmark = pytest.mark.slow


def redis_command_calls(url: str) -> dict[str, int]:
    """Calls per command since the Redis server started (INFO commandstats)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {name: stats["calls"] for name, stats in client.info("commandstats").items()}
    finally:
        client.close()


def test_migrate_and_check_pass_on_postgresql(manage_env, postgres_url):
    env = {**manage_env, "DATABASE_URL": fresh_database(postgres_url, "checkdb")}
    studio = StudioServer(env, workdir=manage_env["NANOSTUDIO_HOME"])
    studio.manage("migrate", "--noinput")
    studio.manage("check", "--database", "default")
    # The tables must be in PostgreSQL, not in a fallback SQLite file.
    with pg_connect(env["DATABASE_URL"]) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"studio_run", "studio_stagerun", "studio_runevent", "django_q_ormq"} <= tables


def test_pipeline_runs_through_postgresql_and_redis(manage_env, postgres_url, redis_url, tmp_path):
    database = fresh_database(postgres_url, "pipelinedb")
    env = {**manage_env, "DATABASE_URL": database, "REDIS_URL": redis_url,
           "NANOSTUDIO_DATA_MIRROR": str(mirror())}
    calls_before = redis_command_calls(redis_url)
    with StudioServer(env, tmp_path / "studio") as studio:
        session = studio.login()
        # tok_train alone (about a second of work) keeps this test about the plumbing, not training.
        run_id = studio.create_run(session, preset="smoke", name="scale", stages=["tok_train"], hardware="cpu")
        run = studio.wait_for_run(session, run_id, timeout=120)
        assert run["status"] == "done", f"run ended {run['status']}: {run.get('error')}"
        assert [s["name"] for s in run["stages"]] == ["tok_train"]

        with RunSocket(studio, session, run_id) as ws:
            snapshot = ws.receive_until(lambda m: m["type"] == "snapshot")[-1]
        assert snapshot["run"]["status"] == "done"
        seqs = [event["seq"] for event in snapshot["events"]]
        # Few events, so nothing is down-sampled: the snapshot is the whole stream, in order, once each.
        assert seqs == list(range(1, snapshot["last_seq"] + 1)), seqs
        kinds = [event["kind"] for event in snapshot["events"]]
        assert kinds[0] == "stage_start" and "stage_end" in kinds

        with pg_connect(database) as conn:
            stored = conn.execute("SELECT count(*), count(DISTINCT seq), max(seq) FROM studio_runevent "
                                  "WHERE run_id = %s", [run_id]).fetchone()
            # The database is this test's own, so the one pipeline task is this run's.
            task = conn.execute("SELECT success FROM django_q_task WHERE func = 'studio.tasks.run_pipeline'").fetchall()
        assert stored == (snapshot["last_seq"],) * 3, f"PostgreSQL holds {stored} events, the socket {snapshot['last_seq']}"
        assert task == [(True,)], f"django-q2's task record: {task}"

    calls_after = redis_command_calls(redis_url)
    # django-q2's Redis broker enqueues with RPUSH (from daphne) and the cluster takes tasks with BLPOP.
    pushed = calls_after.get("cmdstat_rpush", 0) - calls_before.get("cmdstat_rpush", 0)
    popped = calls_after.get("cmdstat_blpop", 0) - calls_before.get("cmdstat_blpop", 0)
    assert pushed >= 1 and popped >= 1, f"Redis saw {pushed} RPUSH and {popped} BLPOP"
    # channels-redis reads a group's members with ZRANGE only in group_send: the worker's wake-ups.
    woken = calls_after.get("cmdstat_zrange", 0) - calls_before.get("cmdstat_zrange", 0)
    assert woken >= 1, "the worker sent no wake-up through the Redis channel layer"


def test_run_socket_refuses_anonymous_users_and_foreign_origins(manage_env, postgres_url, redis_url, tmp_path):
    import requests
    from websockets.exceptions import InvalidStatus

    env = {**manage_env, "DATABASE_URL": fresh_database(postgres_url, "socketdb"), "REDIS_URL": redis_url}
    with StudioServer(env, tmp_path / "studio") as studio:
        session = studio.login()
        assert close_code(studio, requests.Session(), "no-such-run") == 4401
        assert close_code(studio, session, "no-such-run") == 4404
        # A page on another site must not ride on the user's cookie (cross-site WebSocket hijacking).
        with pytest.raises(InvalidStatus) as refused:
            close_code(studio, session, "no-such-run", origin="http://evil.example")
        assert refused.value.response.status_code == 403
