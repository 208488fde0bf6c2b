"""No frame a page (or anyone with a session) can send crashes a studio WebSocket.

Known cases first (each crashed the chat consumer with 1011 before the schemas of
studio/protocol.py), then a property test with hypothesis over both protocols: arbitrary JSON
values in every field of every message type, unknown types, extra fields, numbers Python's
json cannot hold, lone surrogates, deep nesting, non-JSON text and binary frames. Every frame
gets a proper reply or an error naming its field, nothing is logged as a failure, and the
socket still answers a ping afterwards (or, for a frame that is not a JSON object, closes 4400).
"""

from __future__ import annotations

import json
import logging

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from studio import protocol
from studio.models import Conversation, Message, Run
from studio.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)


def communicator(path, user):
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    comm.scope["user"] = user
    return comm


async def exchange(comm, frame):
    """Send one frame, then a ping; return (replies to the frame, close code or None).

    Messages are handled in order, so everything before the pong answers the frame."""
    # send_input, not send_to: send_to refuses empty frames, which a client can send.
    await comm.send_input({"type": "websocket.receive", "bytes" if isinstance(frame, bytes) else "text": frame})
    await comm.send_to(text_data='{"type": "ping"}')
    replies = []
    while True:
        output = await comm.receive_output(timeout=10)
        if output["type"] == "websocket.close":
            return replies, output.get("code")
        message = json.loads(output["text"])
        if message["type"] == "pong":
            return replies, None
        if message["type"] != "ping":  # the server's heartbeat
            replies.append(message)


@pytest.fixture
def chat_ids(user, runs_dir):
    """A conversation of the user's (no checkpoint: nothing can start a generation) to aim ids at."""
    conv = Conversation.objects.create(owner=user, title="fuzz")
    question = Message.objects.create(conversation=conv, role="user", content="q")
    answer = Message.objects.create(conversation=conv, parent=question, role="assistant", status="interrupted")
    conv.leaf = answer
    conv.save()
    return [conv.id, question.id, answer.id]


KNOWN_BAD = [
    ('{"type": "send", "conversation": null, "parent": null, "text": ["a", "list"], "settings": {}}', "text"),
    ('{"type": "edit", "message": 1e400, "text": "x"}', "message"),
    ('{"type": "continue", "message": 1e400}', "message"),
    ('{"type": "open", "conversation": %s}' % ("9" * 5000), "conversation"),
    ('{"type": "select", "conversation": 99999999999999999999999, "message": 1}', "conversation"),
    ('{"type": "send", "conversation": null, "parent": null, "text": "\\ud800", "settings": {}}', "text"),
    ('{"type": "send", "conversation": null, "parent": null, "text": "a\\u0000b", "settings": {}}', "text"),
    ('{"type": "send", "conversation": null, "parent": null, "text": %s, "settings": {}}' % ("[" * 900 + "]" * 900), "text"),
    ('{"type": "settings", "conversation": CONV, "settings": {"run": "\\udfff"}}', "run"),
    ('{"type": "settings", "conversation": CONV, "settings": {"top_k": [[[1]]]}}', "top_k"),
    ('{"type": "settings", "conversation": CONV, "settings": {"temperature": 1e400}}', "temperature"),
    ('{"type": "select", "conversation": CONV, "message": -5}', "message"),
    ('{"type": ["open"]}', "type"),
    ('{"type": {"a": 1}}', "type"),
    ('{"type": "launch"}', "type"),
    ('{"type": "open", "conversation": true}', "conversation"),
    ('{"type": "open", "conversation": "1"}', "conversation"),
]


@pytest.mark.parametrize("frame, field", KNOWN_BAD)
def test_a_bad_field_gets_an_error_naming_it_and_the_socket_keeps_serving(user, chat_ids, frame, field, caplog):
    async def scenario():
        comm = communicator("/ws/chat/", user)
        await comm.connect()
        result = await exchange(comm, frame.replace("CONV", str(chat_ids[0])))  # a conversation of theirs
        again = await exchange(comm, '{"type": "open", "conversation": %d}' % chat_ids[0])
        await comm.disconnect()
        return result, again

    (replies, closed), (again, _) = async_to_sync(scenario)()
    assert closed is None and [r["type"] for r in replies] == ["error"], replies
    assert replies[0]["field"] == field and field in replies[0]["error"]
    assert again[0]["type"] == "conversation"  # the socket still works
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("frame", ["not json", "[1, 2]", '"text"', "null", "[" * 100_000, b"\x00\x01binary", "{" * 3000])
@pytest.mark.parametrize("path", ["/ws/chat/", "/ws/runs/fuzz-run/"])
def test_a_frame_that_is_not_a_json_object_gets_an_error_and_closes_4400(user, runs_dir, path, frame, caplog):
    Run.objects.create(id="fuzz-run", preset="tiny", config={}, status="done")

    async def scenario():
        comm = communicator(path, user)
        await comm.connect()
        result = await exchange(comm, frame)
        await comm.wait(timeout=1)
        return result

    replies, closed = async_to_sync(scenario)()
    assert closed == 4400 and [r["type"] for r in replies] == ["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- property tests ----------------------------------------------------------------------------

# JSON text for one value: anything json.dumps makes, plus what only a hand-written frame holds.
surrogates = st.sampled_from(["\ud800", "\udfff", "\x00"])
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(alphabet=st.characters() | surrogates, max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=8)
raw = st.sampled_from(["1e400", "-1e400", "9" * 5000, "-" + "9" * 50, "NaN", "Infinity", "0", "-1", "1.5",
                       "[" * 800 + "]" * 800, '{"a":' * 500 + "1" + "}" * 500, '"\\ud800"', '""', "{}", "[]"])


def fragment(ids):
    """JSON text of one field value, now and then an id that exists (so handlers get past the lookup)."""
    return values.map(json.dumps) | raw | st.sampled_from(ids).map(str)


def frames(schemas, ids):
    known = st.sampled_from(sorted(schemas))
    kinds = known | st.text(max_size=10)

    @st.composite
    def message(draw):
        kind = draw(kinds)
        names = list(schemas.get(kind, {})) + draw(st.lists(st.text(max_size=8), max_size=2))
        fields = {name: draw(fragment(ids)) for name in names if draw(st.booleans()) or name in schemas.get(kind, {})}
        if draw(st.integers(0, 9)) == 0:
            fields.pop(draw(st.sampled_from(names)) if names else "", None)  # a field missing
        body = ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items())
        type_text = draw(st.sampled_from([json.dumps(kind)]) | fragment(ids)) if draw(st.integers(0, 9)) == 0 else json.dumps(kind)
        return '{"type":' + type_text + ("," + body if body else "") + "}"

    garbage = st.text(max_size=50) | st.binary(max_size=50) | values.map(json.dumps)
    return st.lists(message() | garbage, min_size=1, max_size=4)


CHAT_REPLIES = {"error", "pong", "conversation", "messages", "probs", "leaf", "settings"}
RUN_REPLIES = {"error", "pong", "snapshot", "events", "run", "log", "report"}


def check_socket(path, user, sequence, allowed, max_chars, caplog):
    caplog.clear()

    async def scenario():
        comm = communicator(path, user)
        await comm.connect()
        results = []
        for frame in sequence:
            replies, closed = await exchange(comm, frame)
            results.append((frame, replies, closed))
            if closed is not None:
                return results
        await comm.disconnect()
        return results

    for frame, replies, closed in async_to_sync(scenario)():
        assert {r["type"] for r in replies} <= allowed, (frame[:200], replies)
        errors = [r for r in replies if r["type"] == "error"]
        # An error says what was wrong and, for a bad field, which one.
        assert all(e.get("error") or e.get("message") for e in errors), errors
        assert all(e.get("field") is None or isinstance(e["field"], str) for e in errors), errors
        if closed is not None:
            assert closed == 4400 and errors, (frame[:200], replies, closed)
            # Only a frame that is not one JSON object (or is too big to be one) closes the socket.
            if isinstance(frame, str) and len(frame) <= max_chars:
                try:
                    parsed = json.loads(frame, parse_int=protocol._int_or_float)
                except (ValueError, RecursionError):
                    parsed = None
                assert not isinstance(parsed, dict), frame[:200]
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, failures


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_frame_crashes_the_chat_socket(user, chat_ids, caplog, data):
    sequence = data.draw(frames(protocol.CHAT_MESSAGES, chat_ids))
    check_socket("/ws/chat/", user, sequence, CHAT_REPLIES, 8000 * 6 + 4096, caplog)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_frame_crashes_the_run_socket(user, runs_dir, caplog, data):
    Run.objects.get_or_create(id="fuzz-run", defaults={"preset": "tiny", "config": {}, "status": "done"})
    sequence = data.draw(frames(protocol.RUN_MESSAGES, [0, 1, 5]))
    check_socket("/ws/runs/fuzz-run/", user, sequence, RUN_REPLIES, 4096, caplog)
