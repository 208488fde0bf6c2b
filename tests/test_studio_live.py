"""The run page's WebSocket (studio.consumers.RunConsumer): snapshot, live events, reconnect, security."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from studio import actions, consumers, ingest, live
from studio.models import Run
from studio.routing import websocket_urlpatterns
from pipeline.events import EventWriter

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def run(runs_dir):
    return actions.create_run("tiny", {"stages": "tok_train,base_train"})


def write_steps(run, first, last, stage="base_train"):
    events = EventWriter(run.run_dir, stage)
    for step in range(first, last + 1):
        events.metric(step=step, loss=10.0 / step, smooth_loss=10.0 / step)
    return ingest.ingest_events(Run.objects.get(pk=run.pk))


def communicator(run_id, user):
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/runs/{run_id}/")
    comm.scope["user"] = user
    return comm


async def receive(comm, kind, timeout=5):
    """The next message of `kind` (others, such as pings, are skipped)."""
    while True:
        message = await comm.receive_json_from(timeout=timeout)
        if message["type"] == kind:
            return message


def test_snapshot_then_live_events_then_reconnect_without_gaps_or_duplicates(run, user):
    write_steps(run, 1, 5)

    async def scenario():
        comm = communicator(run.id, user)
        assert (await comm.connect())[0]
        await comm.send_json_to({"type": "hello", "after": None})
        snap = await receive(comm, "snapshot")
        assert [e["step"] for e in snap["events"]] == [1, 2, 3, 4, 5]
        assert snap["last_seq"] == 5 and snap["run"]["id"] == run.id and snap["run"]["status"] == "queued"

        await database_sync_to_async(write_steps)(run, 6, 8)
        live_msg = await receive(comm, "events")
        assert [e["seq"] for e in live_msg["events"]] == [6, 7, 8] and live_msg["last_seq"] == 8
        await comm.disconnect()

        # The network drops; meanwhile the run goes on; the page reconnects with its last seq.
        await database_sync_to_async(write_steps)(run, 9, 12)
        again = communicator(run.id, user)
        assert (await again.connect())[0]
        await again.send_json_to({"type": "hello", "after": 8})
        replay = await receive(again, "events")
        assert [e["seq"] for e in replay["events"]] == [9, 10, 11, 12]
        state = await receive(again, "run")
        assert state["run"]["id"] == run.id
        await again.disconnect()

    async_to_sync(scenario)()


def test_run_state_changes_are_pushed(run, user):
    async def scenario():
        comm = communicator(run.id, user)
        await comm.connect()
        await comm.send_json_to({"type": "hello", "after": None})
        snap = await receive(comm, "snapshot")
        assert snap["run"]["actions"]["cancel"] and snap["run"]["actions"]["resume"] is None
        await database_sync_to_async(actions.cancel_run)(run)
        state = await receive(comm, "run")
        assert state["run"]["status"] == "cancelled"
        assert state["run"]["actions"]["resume"] and state["run"]["actions"]["cancel"] is None
        await comm.disconnect()

    async_to_sync(scenario)()


def test_log_lines_and_report_stream_to_the_page(run, user):
    log = run.run_dir / "logs" / "tok_train.log"
    run.stages.filter(name="tok_train").update(started_at=run.created_at)

    async def scenario():
        comm = communicator(run.id, user)
        await comm.connect()
        await comm.send_json_to({"type": "hello", "after": None})
        await receive(comm, "snapshot")
        log.write_text("first line\nsecond <b>line</b>\npartial")
        message = await receive(comm, "log")
        assert message["lines"] == ["first line", "second <b>line</b>"] and message["stage"] == "tok_train"
        with open(log, "a") as f:
            f.write(" done\n")
        message = await receive(comm, "log")
        assert message["lines"] == ["partial done"]

        (run.run_dir / "report.md").write_text("# Report\n\n<script>alert(1)</script>\n\n| Metric | BASE |\n|---|---|\n| CORE | 0.2 |\n")
        report = await receive(comm, "report")
        assert "<table>" in report["html"] and "<script>" not in report["html"] and "&lt;script&gt;" in report["html"]
        await comm.disconnect()

    async_to_sync(scenario)()


def test_heartbeat_pings_an_idle_page(run, user, monkeypatch):
    monkeypatch.setattr(consumers, "HEARTBEAT_SECONDS", 0.2)

    async def scenario():
        comm = communicator(run.id, user)
        await comm.connect()
        await comm.send_json_to({"type": "hello", "after": None})
        ping = await receive(comm, "ping", timeout=3)
        assert ping["time"] > 0
        await comm.disconnect()

    async_to_sync(scenario)()


def test_anonymous_sockets_are_closed_with_4401(run):
    from django.contrib.auth.models import AnonymousUser

    async def scenario():
        comm = communicator(run.id, AnonymousUser())
        await comm.connect()
        closed = await comm.receive_output(timeout=3)
        assert closed == {"type": "websocket.close", "code": 4401}

    async_to_sync(scenario)()


def test_unknown_run_is_closed_with_4404(runs_dir, user):
    async def scenario():
        comm = communicator("no-such-run", user)
        await comm.connect()
        assert await comm.receive_output(timeout=3) == {"type": "websocket.close", "code": 4404}

    async_to_sync(scenario)()


@pytest.mark.parametrize("message", [{"type": "hello", "after": -1}, {"type": "hello", "after": "7"},
                                     {"type": "hello", "after": 1e400}, {"type": "hello", "after": [7]}])
def test_a_bad_hello_gets_an_error_naming_after_and_the_socket_keeps_serving(run, user, message):
    async def scenario():
        comm = communicator(run.id, user)
        await comm.connect()
        await comm.send_json_to(message)
        error = await receive(comm, "error")
        assert error["field"] == "after" and "after must be null or a sequence number" in error["message"]
        await comm.send_json_to({"type": "hello", "after": None})
        await receive(comm, "snapshot")
        await comm.disconnect()

    async_to_sync(scenario)()


def test_unknown_types_get_an_error_and_frames_that_are_not_json_objects_close_4400(run, user):
    async def scenario():
        comm = communicator(run.id, user)
        await comm.connect()
        await comm.send_json_to({"type": "shout"})
        error = await receive(comm, "error")
        assert error["field"] == "type" and "hello, ping, pong" in error["message"]
        await comm.send_json_to({"type": "ping"})
        await receive(comm, "pong")
        await comm.send_json_to({"type": "hello", "after": None})
        await receive(comm, "snapshot")
        await comm.send_to(text_data="not json")
        assert "JSON" in (await receive(comm, "error"))["message"]
        assert (await comm.receive_output(timeout=3)) == {"type": "websocket.close", "code": 4400}

    async_to_sync(scenario)()


def test_the_real_asgi_app_rejects_foreign_origins(run):
    from nanostudio.asgi import application

    async def scenario():
        comm = WebsocketCommunicator(application, f"/ws/runs/{run.id}/", headers=[(b"origin", b"http://evil.example"), (b"host", b"localhost")])
        connected, _ = await comm.connect()
        assert not connected

    async_to_sync(scenario)()


def test_snapshot_of_a_long_run_is_down_sampled_but_keeps_evals_and_the_recent_tail(run, monkeypatch):
    monkeypatch.setattr(live, "SNAPSHOT_MAX_METRICS", 400)
    monkeypatch.setattr(live, "SNAPSHOT_FULL_TAIL", 50)
    events = EventWriter(run.run_dir, "base_train")
    for step in range(1, 3001):
        events.metric(step=step, loss=1.0)
        if step % 500 == 0:
            events.emit("eval", name="val_bpb", step=step, val_bpb=1.0)
    ingest.ingest_events(run)
    snapshot, sampling = live.snapshot_events(run)
    metric_steps = [e["step"] for e in snapshot if e["kind"] == "metric"]
    assert len(metric_steps) < 400 and sampling["metric_total"] == 3000 and sampling["metric_stride"] == 9
    assert metric_steps[-50:] == list(range(2951, 3001))  # the tail at full rate, which live events continue
    assert all(s % 9 == 0 for s in metric_steps[:-50])
    assert [e["step"] for e in snapshot if e["kind"] == "eval"] == [500, 1000, 1500, 2000, 2500, 3000]
    seqs = [e["seq"] for e in snapshot]
    assert seqs == sorted(set(seqs))


def test_snapshot_events_are_json_serialisable_even_with_nan(run):
    EventWriter(run.run_dir, "base_train").metric(step=1, loss=float("nan"))
    ingest.ingest_events(run)
    snapshot, _ = live.snapshot_events(run)
    json.dumps(snapshot, allow_nan=False)


def test_a_history_too_long_for_one_message_follows_the_snapshot_in_pieces(run, user, monkeypatch):
    # daphne refuses to send a message over 1 MiB; here the budget is 2 kB to see the split.
    monkeypatch.setattr(live, "MESSAGE_BYTES", 2000)
    write_steps(run, 1, 100)

    async def scenario():
        comm = communicator(run.id, user)
        await comm.connect()
        await comm.send_json_to({"type": "hello", "after": None})
        snap = await receive(comm, "snapshot")
        seqs = [e["seq"] for e in snap["events"]]
        assert snap["last_seq"] == seqs[-1] < 100
        pieces = 0
        while seqs[-1] < 100:
            message = await receive(comm, "events")
            assert len(json.dumps(message["events"])) < 2000 + 200
            seqs += [e["seq"] for e in message["events"]]
            pieces += 1
        assert seqs == list(range(1, 101)) and pieces > 3
        await comm.disconnect()

    async_to_sync(scenario)()
