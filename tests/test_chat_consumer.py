"""The chat page's WebSocket (studio.consumers.ChatConsumer) with a real tiny checkpoint on the CPU.

Streaming, Stop (mid-answer and while waiting for a model slot), a page that goes away and
comes back (the answer continues), versions, completion mode with token probabilities,
limits and protocol errors. The model pool is the real one (studio.serving).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from studio import chat
from studio.models import Conversation, Message, Run
from studio.routing import websocket_urlpatterns
from studio.serving import get_pool
from tests.helpers import make_chat_run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real tokenizer and a small random model (256-token context) as base and sft checkpoints."""
    return make_chat_run(tmp_path_factory.mktemp("chatrun"), [("base_train", 10), ("sft_train", 5)], sequence_len=256)


@pytest.fixture
def run(model_dir):
    return Run.objects.create(id="chatrun", preset="tiny", config={}, directory=str(model_dir), status="done")


SFT = {"run": "chatrun", "stage": "sft_train", "step": None, "temperature": 0, "top_k": 0, "max_tokens": 40, "seed": 1}
# Greedy on this random model never picks a stop token: an answer runs to max_tokens.
LONG = dict(SFT, max_tokens=1500)


def communicator(user):
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/chat/")
    comm.scope["user"] = user
    return comm


async def receive(comm, kind, timeout=20):
    """The next message of `kind` within `timeout` s, with every message skipped on the way."""
    skipped = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:  # pings alone would keep a wait for a message that never comes going forever
            raise AssertionError(f"no {kind!r} within {timeout} s; got {[m['type'] for m in skipped]}: {skipped[-3:]}")
        message = await comm.receive_json_from(timeout=left)
        if message["type"] == kind:
            message["skipped"] = skipped
            return message
        skipped.append(message)


async def wait_for(check, timeout=5.0):
    for _ in range(int(timeout / 0.05)):
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


def text_of(deltas):
    return "".join(text for message in deltas if message["type"] == "delta" for _, _, text in message["parts"])


def test_an_answer_streams_as_batched_deltas_and_is_saved(run, user):
    async def scenario():
        comm = communicator(user)
        assert (await comm.connect())[0]
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Hello there, model", "settings": SFT})
        created = await receive(comm, "created")
        assert created["conversation"]["title"] == "Hello there, model"
        assert created["conversation"]["mode"] == "chat" and created["conversation"]["url"].startswith("/chat/")
        question = await receive(comm, "message")
        answer = await receive(comm, "message")
        assert question["message"]["role"] == "user" and question["message"]["content"] == "Hello there, model"
        assert answer["message"]["status"] == "streaming" and answer["message"]["parent"] == question["message"]["id"]
        assert (await receive(comm, "leaf"))["leaf"] == answer["message"]["id"]
        done = await receive(comm, "done")
        await comm.disconnect()
        return done

    done = async_to_sync(scenario)()
    streamed = text_of(done["skipped"])
    kinds = [m["type"] for m in done["skipped"]]
    assert "started" in kinds and "delta" in kinds
    final = done["message"]
    assert final["status"] == "done" and final["finish"] == "length" and final["tokens"] == 40
    assert streamed and streamed == "".join(p["text"] for p in final["parts"])
    # 40 tokens arrive in fewer messages than tokens: deltas are batched.
    assert kinds.count("delta") <= 40
    stored = Message.objects.get(pk=final["id"])
    assert stored.status == "done" and len(stored.token_ids) == 40 and stored.content
    assert Conversation.objects.get(owner=user).leaf_id == stored.id


def test_stop_mid_answer_keeps_what_was_written_and_frees_the_slot(run, user):
    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Write a lot", "settings": LONG})
        await receive(comm, "delta")
        await comm.send_json_to({"type": "stop"})
        done = await receive(comm, "done")
        slot = get_pool().slots[0]
        freed = await wait_for(lambda: not slot.busy)
        await comm.disconnect()
        return done, freed

    done, freed = async_to_sync(scenario)()
    final = done["message"]
    assert final["status"] == "stopped" and final["finish"] == "stopped"
    assert 0 < final["tokens"] < 1500
    assert freed, "the generation thread kept the model slot after Stop"
    assert Message.objects.get(pk=final["id"]).status == "stopped"


def test_stop_while_waiting_for_a_busy_slot_ends_before_the_first_token(run, user, django_user_model):
    other = django_user_model.objects.create_user("grace", password="another long password")

    async def scenario():
        pool = get_pool()
        held = await pool.acquire(other.id, "someone else's checkpoint")  # every slot busy
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Anyone?", "settings": SFT})
        waiting = await receive(comm, "waiting")
        await comm.send_json_to({"type": "stop"})
        done = await receive(comm, "done")
        queued = pool.queue_length()
        pool.release(held)
        await comm.disconnect()
        return waiting, done, queued

    waiting, done, queued = async_to_sync(scenario)()
    assert waiting["position"] == 0
    assert done["message"]["status"] == "stopped" and done["message"]["tokens"] == 0
    assert not any(m["type"] in ("started", "delta") for m in done["skipped"])
    assert queued == 0, "a stopped request stayed in the queue"


def test_a_page_that_goes_away_interrupts_and_the_next_page_continues_the_answer(run, user):
    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Tell a story", "settings": LONG})
        created = await receive(comm, "created")
        await receive(comm, "delta")
        await comm.disconnect()  # a refresh: the socket closes mid-answer
        slot = get_pool().slots[0]
        assert await wait_for(lambda: not slot.busy), "a closed page kept its model slot"
        conv_id = created["conversation"]["id"]
        answer = await database_sync_to_async(lambda: Conversation.objects.get(pk=conv_id).leaf)()
        before = len(answer.token_ids)

        again = communicator(user)
        await again.connect()
        await again.send_json_to({"type": "open", "conversation": conv_id})
        opened = await receive(again, "conversation")
        await again.send_json_to({"type": "continue", "message": answer.id})
        await receive(again, "delta")
        await again.send_json_to({"type": "stop"})
        done = await receive(again, "done")
        await again.disconnect()
        return answer, before, opened, done

    answer, before, opened, done = async_to_sync(scenario)()
    assert answer.status == "interrupted" and before > 0
    leaf = next(m for m in opened["messages"] if m["id"] == opened["leaf"])
    assert leaf["status"] == "interrupted" and opened["generating"] is None
    assert done["message"]["id"] == answer.id and done["message"]["tokens"] > before
    assert done["message"]["parts"][0]["text"].startswith(answer.parts[0]["text"])


def test_regenerate_keeps_versions_and_select_switches_branch(run, user):
    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Hi", "settings": dict(SFT, temperature=1.0, seed=None)})
        conv = (await receive(comm, "created"))["conversation"]
        first = (await receive(comm, "done"))["message"]
        await comm.send_json_to({"type": "regenerate", "message": first["id"]})
        second = (await receive(comm, "done"))["message"]
        await comm.send_json_to({"type": "select", "conversation": conv["id"], "message": first["id"]})
        leaf = await receive(comm, "leaf")
        await comm.send_json_to({"type": "edit", "message": first["parent"], "text": "Hello instead"})
        edited = await receive(comm, "message")
        third = (await receive(comm, "done"))["message"]
        await comm.disconnect()
        return conv, first, second, leaf, edited, third

    conv, first, second, leaf, edited, third = async_to_sync(scenario)()
    assert second["parent"] == first["parent"] and second["id"] != first["id"]
    assert leaf["leaf"] == first["id"]
    assert edited["message"]["role"] == "user" and edited["message"]["content"] == "Hello instead"
    original_question = Message.objects.get(pk=first["parent"])
    assert Message.objects.get(pk=edited["message"]["id"]).parent_id == original_question.parent_id  # a sibling
    assert third["parent"] == edited["message"]["id"]
    assert Conversation.objects.get(pk=conv["id"]).leaf_id == third["id"]


def test_a_base_checkpoint_continues_text_with_token_probabilities(run, user):
    base = dict(SFT, stage="base_train", max_tokens=12)

    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Once upon a time", "settings": base})
        created = await receive(comm, "created")
        done = await receive(comm, "done")
        await comm.disconnect()
        return created, done

    created, done = async_to_sync(scenario)()
    assert created["conversation"]["mode"] == "completion"
    probs = [p for m in done["skipped"] if m["type"] == "delta" for p in m["probs"]]
    final = done["message"]
    assert len(probs) == final["tokens"] == len(final["probs"]) == 12
    for entry in probs:
        assert 0 <= entry["p"] <= 1 and len(entry["top"]) == 5
        assert entry["top"][0][1] >= entry["top"][-1][1]
    # Greedy: the chosen token is the most likely one.
    assert all(entry["p"] == entry["top"][0][1] for entry in probs)
    assert "html" not in final["parts"][0]  # completion text is shown as text, not Markdown


def test_limits_and_bad_settings_get_errors_that_name_the_field(run, user, settings):
    settings.NANOSTUDIO_CHAT_LIMITS = dict(settings.NANOSTUDIO_CHAT_LIMITS, max_message_chars=50)

    async def scenario():
        comm = communicator(user)
        await comm.connect()
        errors = []
        for text, setting in [("x" * 51, SFT), ("   ", SFT), ("hi", dict(SFT, temperature=5)),
                              ("hi", dict(SFT, top_k=-1)), ("hi", dict(SFT, max_tokens=0)),
                              ("hi", dict(SFT, run=None, stage=None)), ("hi", dict(SFT, run="nope")),
                              ("hi", dict(SFT, step=999))]:
            await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": text, "settings": setting})
            errors.append(await receive(comm, "error"))
        await comm.disconnect()
        return errors

    errors = async_to_sync(scenario)()
    fields = [e["field"] for e in errors]
    assert fields == ["text", "text", "temperature", "top_k", "max_tokens", "run", "run", "step"]
    assert "limit is 50" in errors[0]["error"] and "between 0.0 and 2.0" in errors[2]["error"]
    assert "available: {'sft_train': [5], 'base_train': [10]}" in errors[7]["error"]
    assert not Conversation.objects.exists(), "a refused message left a conversation behind"


def test_protocol_errors_close_and_anonymous_sockets_are_refused(run, user):
    from django.contrib.auth.models import AnonymousUser

    async def scenario():
        anon = communicator(AnonymousUser())
        await anon.connect()
        closed_anon = await anon.receive_output(timeout=5)
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "launch-missiles"})
        unknown = await receive(comm, "error")  # a bad field (here the type): an error, the socket stays
        await comm.send_json_to({"type": "ping"})
        await receive(comm, "pong")
        await comm.send_to(text_data="not json")  # not a JSON object at all: a broken page, closed
        garbage = await receive(comm, "error")
        closed = await comm.receive_output(timeout=5)
        return closed_anon, unknown, garbage, closed

    closed_anon, unknown, garbage, closed = async_to_sync(scenario)()
    assert closed_anon == {"type": "websocket.close", "code": 4401}
    assert unknown["field"] == "type" and "open, send" in unknown["error"]
    assert "JSON" in garbage["error"]
    assert closed == {"type": "websocket.close", "code": 4400}


def test_other_peoples_conversations_cannot_be_opened(run, user, django_user_model):
    other = django_user_model.objects.create_user("grace", password="another long password")
    conv = Conversation.objects.create(owner=other, title="private")

    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "open", "conversation": conv.id})
        error = await receive(comm, "error")
        await comm.disconnect()
        return error

    assert async_to_sync(scenario)()["field"] == "conversation"


@pytest.mark.slow
def test_compiled_serving_streams_a_whole_answer(run, user, settings):
    settings.NANOSTUDIO_CHAT_COMPILE = True  # torch.compile of the decode step (frozen bf16 on AMX CPUs)

    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Hi", "settings": SFT})
        done = await receive(comm, "done", timeout=240)  # includes the compile
        await comm.disconnect()
        return done

    done = async_to_sync(scenario)()
    assert done["message"]["status"] == "done" and done["message"]["tokens"] == 40
    assert text_of(done["skipped"]) == "".join(p["text"] for p in done["message"]["parts"])


def test_deleting_a_conversation_mid_answer_stops_the_generation(run, user):
    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "send", "conversation": None, "parent": None, "text": "Keep going", "settings": LONG})
        created = await receive(comm, "created")
        await receive(comm, "delta")
        await database_sync_to_async(chat.delete_conversation)(user, created["conversation"]["id"])
        error = await receive(comm, "error")
        slot = get_pool().slots[0]
        freed = await wait_for(lambda: not slot.busy)
        await comm.disconnect()
        return error, freed

    error, freed = async_to_sync(scenario)()
    assert error["field"] == "conversation" and "deleted" in error["error"]
    assert freed and not Message.objects.exists()


def test_the_socket_greets_with_a_ping_and_answers_pings(user):
    async def scenario():
        comm = communicator(user)
        await comm.connect()
        greeting = await comm.receive_json_from(timeout=5)
        await comm.send_json_to({"type": "pong"})
        quiet = await comm.receive_nothing(timeout=0.3)
        await comm.send_json_to({"type": "ping"})
        answer = await comm.receive_json_from(timeout=5)
        await comm.disconnect()
        return greeting, quiet, answer

    greeting, quiet, answer = async_to_sync(scenario)()
    assert greeting["type"] == "ping" and quiet and answer == {"type": "pong"}


FRAME_LIMIT = 1024 * 1024  # daphne refuses to send a bigger WebSocket message (the socket dies with 1011)


def token_probs(i):
    """What one completion token stores: its text, probability and five alternatives (~150 bytes)."""
    return {"t": f" word{i % 997}", "p": 0.12345, "top": [[f" alt{i % 89}-{k}", round(0.2 - k * 0.03, 5)] for k in range(5)]}


def big_completion_conversation(user, answers=24, tokens=1300, huge_tokens=9000):
    """A completion conversation of several MiB: `answers` regenerated versions of `tokens` tokens each
    under one prompt, and one more answer whose probabilities alone pass 1 MiB."""
    conv = Conversation.objects.create(owner=user, title="big", mode="completion")
    prompt = Message.objects.create(conversation=conv, role="user", content="Once upon a time")
    last = None
    for n in [tokens] * answers + [huge_tokens]:
        text = "".join(f" word{i % 997}" for i in range(n))
        last = Message.objects.create(conversation=conv, parent=prompt, role="assistant", status="done",
                                      parts=[{"type": "text", "text": text}], content=text,
                                      token_ids=list(range(n)), probs=[token_probs(i) for i in range(n)])
    conv.leaf = last
    conv.save()
    return conv


def test_a_conversation_of_several_mib_opens_in_frames_under_the_limit(user):
    """Before: one "conversation" frame of ~6 MiB, refused by daphne (1011), and the page reconnected forever."""
    conv = big_completion_conversation(user)
    whole = chat.open_payload(user, conv.id, set())
    assert len(json.dumps(whole)) > 4 * FRAME_LIMIT

    async def scenario():
        comm = communicator(user)
        await comm.connect()
        await comm.send_json_to({"type": "open", "conversation": conv.id})
        await comm.send_json_to({"type": "ping"})  # messages are handled in order: its pong comes after every frame
        frames = []
        while not frames or json.loads(frames[-1])["type"] != "pong":
            frames.append((await comm.receive_output(timeout=20))["text"])
        await comm.disconnect()
        return frames

    texts = async_to_sync(scenario)()
    assert max(len(t.encode()) for t in texts) < FRAME_LIMIT
    frames = [json.loads(t) for t in texts if json.loads(t)["type"] not in ("ping", "pong")]
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "conversation" and "messages" in kinds and "probs" in kinds
    # Put back together as chat.js does: conversation + messages until more is false, then probs.
    got = frames[0]
    pieces = [f for f in frames if f["type"] == "messages"]
    assert [f["more"] for f in [got] + pieces] == [True] * len(pieces) + [False]
    messages = got["messages"] + [m for f in pieces for m in f["messages"]]
    by_id = {m["id"]: m for m in messages}
    for f in frames:
        if f["type"] == "probs":
            target = by_id[f["message"]]["probs"]
            assert len(target) == f["offset"]  # pieces arrive in order, none lost
            target.extend(f["probs"])
    assert messages == whole["messages"]
    assert (got["conversation"], got["leaf"], got["generating"]) == (whole["conversation"], whole["leaf"], whole["generating"])


def test_a_done_too_big_for_one_frame_is_followed_by_its_probabilities(user):
    conv = big_completion_conversation(user, answers=0)
    frames = chat.message_frames("done", conv.leaf, "completion")
    assert frames[0]["type"] == "done" and frames[0]["message"]["probs"] == [] and len(frames) > 2
    assert all(len(json.dumps(f)) < FRAME_LIMIT for f in frames)
    assert [p for f in frames[1:] for p in f["probs"]] == conv.leaf.probs
    small = chat.message_frames("done", conv.messages.first(), "completion")
    assert len(small) == 1 and small[0]["message"]["role"] == "user"
