"""Chat state and serving without a socket: settings bounds, message trees, safe rendering, the
model pool's fairness and LRU, answer streaming by parts, and the chat views."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync

from studio import chat
from studio.chat import ChatError
from studio.models import Conversation, Message, Run
from studio.serving import Pool, Slot
from gpt.engine import AnswerStream

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("data, field", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"max_tokens": 10**6}, "max_tokens"), ({"seed": -1}, "seed"), ({"stage": "tok_train"}, "stage"),
    ({"step": "latest"}, "step"), ({"run": 5}, "run"),
])
def test_settings_out_of_bounds_name_their_field(data, field):
    with pytest.raises(ChatError) as e:
        chat.clean_settings(data)
    assert e.value.field == field


def test_settings_keep_what_is_not_sent_and_accept_blank_seed():
    current = dict(chat.DEFAULT_SAMPLING, run="r", stage="sft_train", step=5, seed=7)
    cleaned = chat.clean_settings({"temperature": "0.9", "seed": ""}, current)
    assert cleaned == dict(current, temperature=0.9, seed=None)


def make_tree(user):
    """q1 -> a1, a1' (regenerated); q1' (edited) -> a2."""
    conv = Conversation.objects.create(owner=user, title="t")
    q1 = Message.objects.create(conversation=conv, role="user", content="q1")
    a1 = Message.objects.create(conversation=conv, parent=q1, role="assistant", parts=[{"type": "text", "text": "a1"}])
    a1b = Message.objects.create(conversation=conv, parent=q1, role="assistant", parts=[{"type": "text", "text": "a1b"}])
    q1b = Message.objects.create(conversation=conv, role="user", content="q1b")
    a2 = Message.objects.create(conversation=conv, parent=q1b, role="assistant", parts=[{"type": "text", "text": "a2"}])
    conv.leaf = a2
    conv.save()
    return conv, q1, a1, a1b, q1b, a2


def test_selecting_a_version_shows_its_newest_branch(user):
    conv, q1, a1, a1b, q1b, a2 = make_tree(user)
    assert [m.id for m in conv.branch()] == [q1b.id, a2.id]
    conv = chat.select_version(user, conv.id, q1.id)
    assert conv.leaf_id == a1b.id  # the newest answer under q1
    assert [m.id for m in conv.branch()] == [q1.id, a1b.id]
    assert chat.select_version(user, conv.id, a1.id).leaf_id == a1.id


def test_model_output_with_html_is_rendered_as_text(user):
    conv = Conversation.objects.create(owner=user, mode="chat")
    answer = Message.objects.create(conversation=conv, role="assistant", parts=[
        {"type": "text", "text": "<script>alert(1)</script> <img src=x onerror=alert(2)> **bold**\n\n```\ncode <b>\n```"},
        {"type": "python", "text": "<b>1+1</b>"}])
    payload = chat.message_json(answer, "chat")
    html = payload["parts"][0]["html"]
    assert "<script>" not in html and "<img" not in html and "&lt;img" in html
    assert "&lt;script&gt;" in html and "<strong>bold</strong>" in html and "<pre><code>code &lt;b&gt;" in html
    assert "html" not in payload["parts"][1]  # tool parts are text, never HTML


def test_pool_serves_users_round_robin_and_reports_positions():
    async def scenario():
        pool = Pool([Slot(0, "cpu", 1)])
        first = await pool.acquire(1, "k")
        served, positions = [], {}

        async def want(user, name):
            slot = await pool.acquire(user, "k", lambda n: positions.setdefault(name, []).append(n))
            served.append(name)
            await asyncio.sleep(0)
            pool.release(slot)

        tasks = [asyncio.create_task(want(1, "ada-2")), asyncio.create_task(want(1, "ada-3"))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(want(2, "grace-1")))  # asks last, but has not been served yet
        await asyncio.sleep(0)
        pool.release(first)
        await asyncio.gather(*tasks)
        return served, positions

    served, positions = async_to_sync(scenario)()
    assert served == ["grace-1", "ada-2", "ada-3"]
    assert positions["grace-1"] == [0] and positions["ada-3"][0] in (1, 2)


def test_cancelled_waiter_leaves_the_queue():
    async def scenario():
        pool = Pool([Slot(0, "cpu", 1)])
        held = await pool.acquire(1, "k")
        waiter = asyncio.create_task(pool.acquire(2, "k"))
        await asyncio.sleep(0)
        assert pool.queue_length() == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        queued = pool.queue_length()
        pool.release(held)
        return queued, held.busy

    assert async_to_sync(scenario)() == (0, False)


def test_slots_keep_the_most_recently_used_checkpoints():
    loads = []
    slot = Slot(0, "cpu", 2)

    def load(key, device):
        loads.append(key)
        return key

    for key in ["a", "b", "a", "c", "a", "b"]:
        slot.get(key, load)
    assert loads == ["a", "b", "c", "b"]  # c evicted b (least recent), b evicted c
    assert list(slot.models) == ["a", "b"]


def test_answer_stream_splits_tool_calls_into_parts(tmp_path):
    from tests.helpers import mirror
    from trainer import tok_train
    from gpt.tokenizer import Tokenizer
    import os

    os.environ["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    assert tok_train.main(["--run-dir", str(tmp_path), "--vocab-size", "512", "--max-chars", "100000", "--doc-cap", "3000"]) == 0
    tok = Tokenizer.from_dir(tmp_path / "tokenizer")
    s = tok.special_ids
    stream = AnswerStream(tok, completion=False)
    for token in [*tok.encode("Let me add. "), s["<|python_start|>"], *tok.encode("2+3"), s["<|python_end|>"],
                  s["<|output_start|>"], *tok.encode("5"), s["<|output_end|>"], *tok.encode(" So 5.")]:
        stream.add(token)
    parts = stream.finish()
    assert parts == [{"type": "text", "text": "Let me add. "}, {"type": "python", "text": "2+3"},
                     {"type": "python_output", "text": "5"}, {"type": "text", "text": " So 5."}]
    indexes = sorted({d[0] for d in stream.take_deltas()})
    assert indexes == [0, 1, 2, 3]


def test_chat_page_lists_checkpoints_and_only_my_conversations(client, user, django_user_model, runs_dir):
    from tests.helpers import save_test_checkpoints
    from gpt.model import GPTConfig, build_model

    run = Run.objects.create(id="r1", name="tiny one", preset="tiny", config={}, status="done")
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16), "cpu")
    save_test_checkpoints(run.run_dir, model, [("base_train", 3), ("base_train", 1), ("sft_train", 2)])
    mine = Conversation.objects.create(owner=user, title="mine <b>bold</b>")
    other = django_user_model.objects.create_user("grace", password="another long password")
    theirs = Conversation.objects.create(owner=other, title="theirs")

    page = client.get("/chat/")
    assert page.status_code == 200
    config = page.context["chat_config"]
    assert config["checkpoints"] == [
        {"run": "r1", "run_label": "tiny one", "stage": "sft_train", "mode": "chat", "steps": [2]},
        {"run": "r1", "run_label": "tiny one", "stage": "base_train", "mode": "completion", "steps": [1, 3]}]
    assert config["settings"]["run"] == "r1" and config["settings"]["stage"] == "sft_train"
    assert list(page.context["conversations"]) == [mine]
    assert b"mine &lt;b&gt;bold&lt;/b&gt;" in page.content
    assert client.get(f"/chat/{mine.id}/").status_code == 200
    assert client.get(f"/chat/{theirs.id}/").status_code == 404


def test_rename_and_delete_answer_json_and_refuse_other_peoples_chats(client, user, django_user_model):
    mine = Conversation.objects.create(owner=user, title="old")
    other = django_user_model.objects.create_user("grace", password="another long password")
    theirs = Conversation.objects.create(owner=other, title="theirs")
    json_headers = {"HTTP_ACCEPT": "application/json"}

    ok = client.post(f"/chat/{mine.id}/rename/", {"title": "  New name "}, **json_headers)
    assert ok.json() == {"ok": True, "title": "New name", "url": f"/chat/{mine.id}/"}
    empty = client.post(f"/chat/{mine.id}/rename/", {"title": " "}, **json_headers)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    assert client.post(f"/chat/{theirs.id}/rename/", {"title": "x"}, **json_headers).status_code == 404
    assert client.post(f"/chat/{theirs.id}/delete/", **json_headers).status_code == 404
    assert client.post(f"/chat/{mine.id}/delete/", **json_headers).json() == {"ok": True, "url": "/chat/"}
    assert not Conversation.objects.filter(pk=mine.pk).exists() and Conversation.objects.filter(pk=theirs.pk).exists()
    assert client.get(f"/chat/{mine.id}/delete/").status_code == 405


def test_run_page_links_to_a_chat_with_that_run_picked(client, runs_dir):
    from tests.helpers import save_test_checkpoints
    from gpt.model import GPTConfig, build_model

    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16), "cpu")
    newer = Run.objects.create(id="r2", preset="tiny", config={}, status="done")
    save_test_checkpoints(newer.run_dir, model, [("sft_train", 4)])
    run = Run.objects.create(id="r1", preset="tiny", config={}, status="done")
    untrained = Run.objects.create(id="r0", preset="tiny", config={}, status="queued")
    save_test_checkpoints(run.run_dir, model, [("base_train", 1), ("base_train", 3), ("mid_train", 2)])

    page = client.get("/runs/r1/")
    assert page.context["chat_url"] == "/chat/?run=r1" and b'id="chat-link"' in page.content
    assert client.get("/runs/r0/").context["chat_url"] == ""

    def picked(query):
        return client.get("/chat/" + query).context["chat_config"]["settings"]

    assert (picked("")["run"], picked("")["stage"]) == ("r1", "mid_train")  # newest run first
    assert (picked("?run=r2")["run"], picked("?run=r2")["stage"]) == ("r2", "sft_train")
    chosen = picked("?run=r1&stage=base_train&step=1")
    assert (chosen["stage"], chosen["step"]) == ("base_train", 1)
    assert picked("?run=r1&stage=base_train&step=99")["step"] is None  # no such step: the latest
    assert picked("?run=nope")["run"] == "r1" and untrained  # unknown run: the defaults


def test_search_finds_words_in_titles_and_messages_of_my_conversations_only(client, user, django_user_model):
    by_title = Conversation.objects.create(owner=user, title="Zebra facts")
    by_message = Conversation.objects.create(owner=user, title="untitled")
    Message.objects.create(conversation=by_message, role="assistant", content="Zebras have stripes")
    Conversation.objects.create(owner=user, title="other")
    other = django_user_model.objects.create_user("grace", password="another long password")
    theirs = Conversation.objects.create(owner=other, title="zebra too")

    found = client.get("/chat/search.json", {"q": " ZEBRA "}).json()["ids"]
    assert sorted(found) == sorted([by_title.id, by_message.id]) and theirs.id not in found
    assert len(client.get("/chat/search.json").json()["ids"]) == 3
    too_long = client.get("/chat/search.json", {"q": "x" * 201})
    assert too_long.status_code == 400 and "200" in too_long.json()["error"]
