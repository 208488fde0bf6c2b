"""What the studio's WebSockets protect: only the studio's own pages may open them, one person
cannot read or touch another's conversations, and stray paths and links are refused cleanly.

- Origin: studio/origin.py (SameOriginValidator) on the real ASGI application.
- Ownership: two people on two chat sockets at once; the attacker sends every message type with
  the ids of the other person's conversation while that person's answer streams (or waits for a
  model slot), and nothing of theirs changes; the error is the one a missing id gets.
- Routes and links: an unknown WebSocket path, odd ?step=/?run=/?stage= on /chat/, huge ids in URLs.

The browser version of the origin check (a page of another port in a logged-in Chromium) is in
tests/test_chat_browser.py.
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from studio import consumers
from studio.models import Conversation, Message, Run
from studio.routing import websocket_urlpatterns
from studio.serving import get_pool
from tests.helpers import make_chat_run

pytestmark = pytest.mark.django_db(transaction=True)


# --- Origin ------------------------------------------------------------------------------------

def handshake(path, headers, scheme="ws"):
    """Whether the real application (origin check, auth, routes) accepts a handshake, and its first message."""
    from nanostudio.asgi import application

    async def scenario():
        comm = WebsocketCommunicator(application, path, headers=headers)
        comm.scope["scheme"] = scheme
        connected, _ = await comm.connect()
        first = await comm.receive_output(timeout=3) if connected else None
        await comm.disconnect()
        return connected, first

    return async_to_sync(scenario)()


def origin_headers(origin, host="127.0.0.1:8000"):
    headers = [(b"host", host.encode())]
    return headers + [(b"origin", origin.encode())] if origin is not None else headers


@pytest.mark.parametrize("path", ["/ws/chat/", "/ws/runs/some-run/"])
@pytest.mark.parametrize("origin, host, scheme", [
    ("http://127.0.0.1:9999", "127.0.0.1:8000", "ws"),     # same host, another port: the reported hijack
    ("http://127.0.0.1", "127.0.0.1:8000", "ws"),          # same host, default port
    ("https://127.0.0.1:8000", "127.0.0.1:8000", "ws"),    # another scheme
    ("http://127.0.0.1:8000", "127.0.0.1:8000", "wss"),    # a plain page opening the TLS socket
    ("http://localhost:8000", "127.0.0.1:8000", "ws"),     # another allowed host name is another origin
    ("http://evil.example", "127.0.0.1:8000", "ws"),
    ("http://evil.example:8000", "evil.example:8000", "ws"),  # DNS rebinding: Host not in ALLOWED_HOSTS
    ("null", "127.0.0.1:8000", "ws"),                      # sandboxed frames and file: pages
    ("http://127.0.0.1:99999", "127.0.0.1:8000", "ws"),    # not a port
])
def test_pages_of_other_origins_are_refused_at_the_handshake(path, origin, host, scheme):
    connected, first = handshake(path, origin_headers(origin, host), scheme)
    assert not connected and first is None


@pytest.mark.parametrize("origin, host, scheme", [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", "ws"),
    ("http://localhost:8000", "localhost:8000", "ws"),
    ("https://127.0.0.1:8000", "127.0.0.1:8000", "wss"),
    ("http://LOCALHOST:8000", "localhost:8000", "ws"),     # host names are case-insensitive
    ("http://[::1]:8000", "[::1]:8000", "ws"),
    ("http://localhost", "localhost", "ws"),                # default ports on both sides
    ("http://localhost:80", "localhost", "ws"),
])
def test_the_studios_own_origin_is_accepted(origin, host, scheme):
    connected, first = handshake("/ws/chat/", origin_headers(origin, host), scheme)
    # Accepted by the origin check; the consumer then closes an anonymous socket with 4401.
    assert connected and first == {"type": "websocket.close", "code": 4401}


def test_a_missing_origin_is_accepted_because_browsers_always_send_one():
    connected, first = handshake("/ws/chat/", origin_headers(None))
    assert connected and first["code"] == 4401


def test_trusted_origins_of_a_reverse_proxy_are_accepted(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://studio.example.com", "https://*.lab.example"]
    behind_proxy = "127.0.0.1:8000"  # the Host the proxy forwards
    for origin in ("https://studio.example.com", "https://gpu.lab.example", "https://lab.example"):
        assert handshake("/ws/chat/", origin_headers(origin, behind_proxy))[0], origin
    for origin in ("http://studio.example.com", "https://studio.example.com:8443", "https://evil.example"):
        assert not handshake("/ws/chat/", origin_headers(origin, behind_proxy))[0], origin


def test_a_tls_proxy_header_makes_the_own_origin_https(settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    headers = origin_headers("https://127.0.0.1:8000") + [(b"x-forwarded-proto", b"https")]
    assert handshake("/ws/chat/", headers)[0]
    assert not handshake("/ws/chat/", origin_headers("https://127.0.0.1:8000"))[0]


def test_an_unknown_websocket_path_is_refused_at_the_handshake_without_a_traceback(caplog):
    for path in ("/ws/nothing/", "/", "/ws/runs/a b/", "/ws/runs/" + "x" * 65 + "/", "/ws/chat/extra/"):
        connected, _ = handshake(path, origin_headers("http://127.0.0.1:8000"))
        assert not connected, path
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# --- Links with odd query parameters and ids ---------------------------------------------------

@pytest.mark.parametrize("query", ["?run=r1&step=²", "?run=r1&step=" + "9" * 5000, "?run=r1&step=-1",
                                   "?run=r1&step=%00", "?run=%00&stage=%00", "?run=r1&stage=" + "x" * 5000,
                                   "?run=" + "é" * 3000, "?run=r1&stage=sft_train&step=٣"])
def test_chat_links_with_odd_parameters_open_the_page(client, runs_dir, query):
    Run.objects.create(id="r1", preset="tiny", config={}, status="done")
    page = client.get("/chat/" + query)
    assert page.status_code == 200
    if "step=" in query:
        assert "step must be a whole number" in page.content.decode()


def test_ids_too_big_for_the_database_are_not_found(client):
    huge = "9" * 30  # the URL converter takes any digits; SQLite and PostgreSQL refuse such a number
    assert client.get(f"/chat/{huge}/").status_code == 404
    for action in ("rename", "delete"):
        response = client.post(f"/chat/{huge}/{action}/", {"title": "x"}, HTTP_ACCEPT="application/json")
        assert response.status_code == 404 and response.json()["field"] == "conversation"


# --- Two people, one server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_run(tmp_path_factory.mktemp("securityrun"), [("sft_train", 5)], sequence_len=256)


@pytest.fixture
def run(model_dir):
    return Run.objects.create(id="chatrun", preset="tiny", config={}, directory=str(model_dir), status="done")


SFT = {"run": "chatrun", "stage": "sft_train", "step": None, "temperature": 0, "top_k": 0, "max_tokens": 40, "seed": 1}
LONG = dict(SFT, max_tokens=1500)  # greedy on the random model: writes until stopped
NO_SUCH = 10**12  # an id nobody has


def socket(user):
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/chat/")
    comm.scope["user"] = user
    return comm


async def receive(comm, kind, timeout=20):
    skipped = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, f"no {kind!r} within {timeout} s; got {[m['type'] for m in skipped]}"
        message = await comm.receive_json_from(timeout=left)
        if message["type"] == kind:
            message["skipped"] = skipped
            return message
        skipped.append(message)


def state_of(conv_id):
    """Everything of a conversation an attack could change (the streaming answer's text grows by itself)."""
    conv = Conversation.objects.get(pk=conv_id)
    messages = [(m.id, m.parent_id, m.role, m.content if m.status != "streaming" else None, m.status)
                for m in conv.messages.order_by("id")]
    return (conv.title, conv.leaf_id, conv.run_id, conv.stage, conv.step, conv.temperature, conv.top_k,
            conv.max_tokens, conv.seed, messages)


# Each attack names the other person's ids through VICTIM_* placeholders; OWN_* are the attacker's.
ATTACKS = {
    "open": {"type": "open", "conversation": "VICTIM_CONV"},
    "send-into": {"type": "send", "conversation": "VICTIM_CONV", "parent": "VICTIM_ANSWER", "text": "hi", "settings": None},
    "send-under": {"type": "send", "conversation": "OWN_CONV", "parent": "VICTIM_ANSWER", "text": "hi", "settings": None},
    "edit": {"type": "edit", "message": "VICTIM_QUESTION", "text": "rewritten"},
    "regenerate": {"type": "regenerate", "message": "VICTIM_ANSWER"},
    "continue": {"type": "continue", "message": "VICTIM_ANSWER"},
    "select": {"type": "select", "conversation": "VICTIM_CONV", "message": "VICTIM_QUESTION"},
    "select-into-own": {"type": "select", "conversation": "OWN_CONV", "message": "VICTIM_QUESTION"},
    "settings": {"type": "settings", "conversation": "VICTIM_CONV", "settings": {"temperature": 1.5, "max_tokens": 5}},
}


def fill(message, ids):
    return {k: ids.get(v, v) if isinstance(v, str) else v for k, v in message.items()}


@pytest.mark.parametrize("phase", ["streaming", "waiting"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_nobody_can_touch_another_persons_conversation(run, user, django_user_model, attack, phase):
    """Before the fix, "continue" with the other person's answer id stopped their answer (it was
    taken over as if it were the attacker's own tab) before ownership was checked."""
    victim = django_user_model.objects.create_user("grace", password="another long password")
    own = Conversation.objects.create(owner=user, title="mine", run=run, stage="sft_train")
    Message.objects.create(conversation=own, role="user", content="my question")

    async def scenario():
        pool = get_pool()
        held = await pool.acquire(0, "a third person's checkpoint") if phase == "waiting" else None
        theirs = socket(victim)
        await theirs.connect()
        await theirs.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "my secret", "settings": LONG})
        conv = (await receive(theirs, "created"))["conversation"]
        question = (await receive(theirs, "message"))["message"]
        answer = (await receive(theirs, "message"))["message"]
        await receive(theirs, "delta" if phase == "streaming" else "waiting")
        ids = {"VICTIM_CONV": conv["id"], "VICTIM_QUESTION": question["id"], "VICTIM_ANSWER": answer["id"], "OWN_CONV": own.id}
        before = await database_sync_to_async(state_of)(conv["id"])

        mine = socket(user)
        await mine.connect()
        await mine.send_json_to(fill(ATTACKS[attack], ids))
        refused = await receive(mine, "error")
        # The same message with ids nobody has: the answer must not tell the two apart.
        await mine.send_json_to(fill(ATTACKS[attack], {k: (v if k == "OWN_CONV" else NO_SUCH) for k, v in ids.items()}))
        missing = await receive(mine, "error")
        await mine.send_json_to({"type": "stop"})  # Stop only ever ends the sender's own answer
        await mine.send_json_to({"type": "ping"})
        leaked = (await receive(mine, "pong"))["skipped"]
        await mine.disconnect()

        still_live = consumers.LIVE.get(answer["id"]) is not None
        queued = pool.queue_length()
        if held is not None:
            pool.release(held)
        await receive(theirs, "delta")  # their answer goes on (or starts, once the slot is free)
        await asyncio.sleep(0.3)
        after = await database_sync_to_async(state_of)(conv["id"])
        await theirs.send_json_to({"type": "stop"})
        done = await receive(theirs, "done")
        await theirs.disconnect()
        return refused, missing, leaked, before, after, still_live, queued, done, ids

    refused, missing, leaked, before, after, still_live, queued, done, ids = async_to_sync(scenario)()
    assert still_live, "the other person's answer was stopped"
    assert phase == "streaming" or queued == 1, "the other person's request left the queue"
    assert done["message"]["status"] == "stopped" and not [m for m in done["skipped"] if m["type"] == "done"]
    assert before == after, "the other person's conversation changed"
    assert {k: refused[k] for k in ("type", "error", "field")} == {k: missing[k] for k in ("type", "error", "field")}
    assert refused["field"] in ("conversation", "message", "parent")
    assert not [m for m in leaked if m["type"] not in ("ping",)], leaked
    assert Conversation.objects.filter(owner=user).count() == 1


def test_the_chat_views_refuse_another_persons_conversation_like_a_missing_one(client, user, django_user_model):
    victim = django_user_model.objects.create_user("grace", password="another long password")
    theirs = Conversation.objects.create(owner=victim, title="their secret")
    Message.objects.create(conversation=theirs, role="user", content="a secret word: zebra")
    json_headers = {"HTTP_ACCEPT": "application/json"}
    for conv_id in (theirs.id, NO_SUCH):
        assert client.get(f"/chat/{conv_id}/").status_code == 404
        renamed = client.post(f"/chat/{conv_id}/rename/", {"title": "mine now"}, **json_headers)
        deleted = client.post(f"/chat/{conv_id}/delete/", **json_headers)
        assert (renamed.status_code, deleted.status_code) == (404, 404)
        assert renamed.json()["error"] == deleted.json()["error"] == "no such conversation (it may have been deleted)"
    assert client.get("/chat/search.json", {"q": "zebra"}).json()["ids"] == []
    assert b"their secret" not in client.get("/chat/").content
    theirs.refresh_from_db()
    assert theirs.title == "their secret" and theirs.messages.count() == 1
