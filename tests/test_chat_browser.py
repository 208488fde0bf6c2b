"""The chat page end to end in a real browser: headless Chromium, daphne + qcluster, a tiny trained checkpoint.

A run directory with a real tokenizer and a 2-layer model trained for a few dozen steps on a handful of
conversations (so it answers in a few tokens and ends its turn) is registered in the server's database;
the test then chats with it through /chat/: a streamed answer, Regenerate (versions "2/2"), and a message
full of HTML that must stay text. Needs /usr/bin/chromium and the data mirror. Run with:

    .venv/bin/python -m pytest tests/test_chat_browser.py -q

On failure a screenshot, the page's HTML and its console log are saved under the test's tmp dir.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import mirror, save_test_checkpoints
from tests.servers import StudioServer, require_chromium
from tests.test_studio_browser import log_in, save_evidence

pytestmark = pytest.mark.slow

RUN_ID = "chat-browser-run"
XSS = "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>"
# What the model learns to say: any question gets a short, finished answer.
LESSONS = [
    ("Hello there", "Hi! I am a tiny model."),
    ("How are you?", "I am fine, thank you."),
    ("What is two plus two?", "Two plus two is four."),
    ("Tell me a story", "Once upon a time there was a cat."),
]

# Records the type of every message the page's chat socket receives, in order, before the page's own code runs.
RECORD_SOCKET = """() => {
    window.__chatTypes = [];
    const Native = window.WebSocket;
    window.WebSocket = class extends Native {
        constructor(...args) {
            super(...args);
            this.addEventListener('message', (e) => {
                try { window.__chatTypes.push(JSON.parse(e.data).type); } catch (err) {}
            });
        }
    };
}"""


def train_chat_checkpoint(run_dir: Path, steps: int = 60) -> None:
    """A tokenizer and a tiny model trained on LESSONS, saved as sft_train and base_train checkpoints of `run_dir`."""
    import torch

    from trainer import tok_train
    from gpt.model import GPTConfig, build_model
    from gpt.tokenizer import Tokenizer

    assert tok_train.main(["--run-dir", str(run_dir), "--vocab-size", "1024", "--max-chars", "300000",
                           "--doc-cap", "5000"]) == 0
    tok = Tokenizer.from_dir(run_dir / "tokenizer")
    rows = []
    for question, answer in LESSONS:
        ids, mask = tok.render_conversation([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}])
        targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]  # learn the answers only
        rows.append((ids[:-1], targets))
    width = max(len(x) for x, _ in rows)
    inputs = torch.tensor([x + [0] * (width - len(x)) for x, _ in rows])
    targets = torch.tensor([y + [-1] * (width - len(y)) for _, y in rows])

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with the servers
    try:
        model = build_model(GPTConfig(sequence_len=64, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=1, n_embd=64),
                            "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        first = None
        for _ in range(steps):
            loss = model(inputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first = first if first is not None else loss.item()
        assert loss.item() < first / 2, f"the tiny model did not learn: loss {first:.2f} -> {loss.item():.2f}"
    finally:
        torch.set_num_threads(threads)
    # The same weights as a base checkpoint too: base checkpoints are chatted with in completion mode.
    save_test_checkpoints(run_dir, model, [("base_train", steps), ("sft_train", steps)])


def register_run(studio: StudioServer, run_id: str) -> None:
    """Put the run in the server's database; its directory defaults to NANOSTUDIO_RUNS_DIR/<id>."""
    studio.manage("shell", "-c", "from studio.models import Run; "
                  f"Run.objects.create(id={run_id!r}, preset='smoke', config={{}}, status='done')")


def assistant(page, index: int):
    return page.locator("#chat-thread .msg-assistant").nth(index)


@contextmanager
def chat_page(manage_env, tmp_path, monkeypatch, extra_env=None):
    """A studio with the tiny checkpoint registered and a logged-in Chromium page on /chat/; yields (studio, page).

    On failure the page's screenshot, HTML and console are saved; a page error fails the test.
    """
    chromium = require_chromium()
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("NANOSTUDIO_DATA_MIRROR", str(mirror()))
    train_chat_checkpoint(Path(manage_env["NANOSTUDIO_RUNS_DIR"]) / RUN_ID)
    env = {**manage_env, "NANOSTUDIO_DATA_MIRROR": str(mirror()), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    with StudioServer(env, tmp_path / "studio") as studio, sync_playwright() as playwright:
        register_run(studio, RUN_ID)
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        page.add_init_script(f"({RECORD_SOCKET})()")
        try:
            log_in(page, studio)
            page.goto(studio.url("/chat/"))
            expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)
            yield studio, page
            assert [m for m in console if m.startswith("pageerror")] == []
        except BaseException:
            save_evidence(page, console, tmp_path)
            raise
        finally:
            browser.close()


def send(page, text: str) -> None:
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def test_chat_page_streams_regenerates_and_keeps_html_as_text(manage_env, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    with chat_page(manage_env, tmp_path, monkeypatch) as (studio, page):
        expect(page.locator("#ckpt-select")).to_contain_text(RUN_ID)
        expect(page.locator("#step-select option").first).to_have_text("latest (step 60)")
        # Bounds come from the server's limits; a value outside them is explained.
        page.click("#sampling summary")
        page.fill("#set-temperature", "9")
        expect(page.locator("#err-temperature")).to_contain_text("between 0 and 2")
        page.fill("#set-temperature", "0")
        expect(page.locator("#err-temperature")).to_be_hidden()
        page.fill("#set-max_tokens", "24")

        # A first message in a new chat: the conversation is created, the URL and sidebar follow.
        send(page, "Hello there")
        expect(page.locator("#chat-thread .msg-user .msg-text")).to_have_text("Hello there")
        page.wait_for_url(re.compile(r"/chat/\d+/$"), timeout=30_000)
        conversation_id = re.search(r"/chat/(\d+)/$", page.url).group(1)
        expect(page.locator(f"#conv-list .conv.current[data-id='{conversation_id}']")).to_be_visible()

        # The answer streams in as deltas, then finishes: not streaming any more, Regenerate offered.
        first = assistant(page, 0)
        expect(first).to_have_attribute("data-status", "done", timeout=120_000)
        expect(first.locator(".msg-body")).not_to_have_text("")
        types = page.evaluate("window.__chatTypes")
        assert "delta" in types and types.index("delta") < types.index("done"), types
        expect(page.locator("#stop-button")).to_be_hidden()
        regenerate = first.locator("button[data-act=regenerate]")
        expect(regenerate).to_be_visible()

        regenerate.click()
        expect(assistant(page, 0).locator(".version-index")).to_have_text("2/2", timeout=30_000)
        expect(assistant(page, 0)).to_have_attribute("data-status", "done", timeout=120_000)
        # The first version is still there: "‹" selects it.
        assistant(page, 0).locator("button[title='Previous version']").click()
        expect(assistant(page, 0).locator(".version-index")).to_have_text("1/2", timeout=30_000)

        # HTML in a message is text: shown as typed, never run.
        send(page, XSS)
        expect(page.locator("#chat-thread .msg-user .msg-text").last).to_have_text(XSS)
        expect(assistant(page, 1)).to_have_attribute("data-status", re.compile("done|error"), timeout=120_000)
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.locator("#chat-thread img, #chat-thread script").count() == 0

        # After a reload the same branch and settings come back from the server, still as text.
        page.reload()
        expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)
        expect(page.locator("#chat-thread .msg-user .msg-text").last).to_have_text(XSS, timeout=30_000)
        expect(page.locator("#set-max_tokens")).to_have_value("24")
        assert page.evaluate("typeof window.__xss") == "undefined"


def test_sidebar_renames_filters_and_deletes_conversations(manage_env, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    with chat_page(manage_env, tmp_path, monkeypatch) as (studio, page):
        page.click("#sampling summary")
        page.fill("#set-max_tokens", "8")
        send(page, "Tell me a story")
        expect(assistant(page, 0)).to_have_attribute("data-status", "done", timeout=120_000)
        item = page.locator("#conv-list .conv.current")
        expect(item.locator(".conv-title")).to_have_text("Tell me a story")

        item.locator("button[data-act=rename]").click()
        item.locator("input[name=title]").fill("Bedtime <b>stories</b>")
        item.locator("input[name=title]").press("Enter")
        expect(item.locator(".conv-title")).to_have_text("Bedtime <b>stories</b>")
        page.reload()  # stored by the server, not just shown
        expect(page.locator("#conv-list .conv.current .conv-title")).to_have_text("Bedtime <b>stories</b>")

        page.fill("#conv-filter", "nothing like it")
        expect(page.locator("#conv-list .conv.current")).to_be_hidden()
        page.fill("#conv-filter", "BEDTIME")
        expect(page.locator("#conv-list .conv.current")).to_be_visible()
        page.fill("#conv-filter", "me a story")  # in the first message, no longer in the title: the server finds it
        expect(page.locator("#conv-list .conv.current")).to_be_visible(timeout=10_000)

        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#conv-list .conv.current button[title=Delete]").click()
        page.wait_for_url(re.compile(r"/chat/$"), timeout=30_000)
        expect(page.locator("#conv-list .conv")).to_have_count(0)


def test_completion_mode_shows_the_document_with_token_probabilities(manage_env, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    with chat_page(manage_env, tmp_path, monkeypatch) as (studio, page):
        page.select_option("#ckpt-select", label=f"{RUN_ID} · base_train (completion)")
        expect(page.locator("#chat-page")).to_have_attribute("data-mode", "completion")
        page.click("#sampling summary")
        page.fill("#set-max_tokens", "12")
        send(page, "Once upon a time")
        model = page.locator("#chat-thread .document .doc-model").first
        expect(model).to_have_attribute("data-status", "done", timeout=120_000)
        expect(page.locator("#chat-thread .document .doc-user")).to_have_text("Once upon a time")
        tokens = model.locator(".tok[data-prob]")
        assert tokens.count() > 0
        tokens.first.hover()
        expect(page.locator("#prob-popover")).to_be_visible()
        expect(page.locator("#prob-popover")).to_contain_text("%")

        # An empty Send continues the document.
        expect(page.locator("#send-button")).to_have_text("Continue")
        page.click("#send-button")
        expect(page.locator("#chat-thread .document .doc-model")).to_have_count(2, timeout=30_000)
        expect(page.locator("#chat-thread .document .doc-model").nth(1)).to_have_attribute("data-status", "done",
                                                                                          timeout=120_000)


LONG_RUN = "chat-long-run"


def save_endless_checkpoint(runs_dir: Path) -> None:
    """A random model that, greedy, never ends its turn: answers run to max tokens (long enough to
    stop or refresh halfway), with the tokenizer of the trained run."""
    import shutil

    import torch

    from gpt.model import GPTConfig, build_model

    shutil.copytree(runs_dir / RUN_ID / "tokenizer", runs_dir / LONG_RUN / "tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=256, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=1, n_embd=64), "cpu")
    save_test_checkpoints(runs_dir / LONG_RUN, model, [("sft_train", 1)])


def test_refresh_mid_answer_keeps_streaming_and_stop_ends_it(manage_env, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    # Answers of up to 20,000 tokens: the model would write for a minute, the test stops it.
    with chat_page(manage_env, tmp_path, monkeypatch, {"NANOSTUDIO_CHAT_MAX_NEW_TOKENS": "20000"}) as (studio, page):
        save_endless_checkpoint(Path(manage_env["NANOSTUDIO_RUNS_DIR"]))
        register_run(studio, LONG_RUN)
        page.reload()
        expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)
        page.select_option("#ckpt-select", label=f"{LONG_RUN} · sft_train")
        page.click("#sampling summary")
        page.fill("#set-temperature", "0")
        page.fill("#set-max_tokens", "20000")
        send(page, "Go on and on")
        answer = assistant(page, 0)
        expect(answer).to_have_attribute("data-status", "streaming", timeout=60_000)
        expect(page.locator("#stop-button")).to_be_visible()
        page.wait_for_function("() => (document.querySelector('#chat-thread .msg-assistant .msg-body') || {}).textContent?.length > 20",
                               timeout=60_000)
        page.wait_for_url(re.compile(r"/chat/\d+/$"), timeout=30_000)

        # A refresh mid-answer: the page shows what was written and the answer keeps growing.
        page.reload()
        expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)
        body = assistant(page, 0).locator(".msg-body")
        expect(assistant(page, 0)).to_have_attribute("data-status", "streaming", timeout=30_000)
        before = len(body.text_content())
        assert before > 20
        page.wait_for_function(f"() => document.querySelector('#chat-thread .msg-assistant .msg-body').textContent.length > {before + 20}",
                               timeout=60_000)

        # Esc stops it on the server: the answer is kept as it is, marked stopped, and stays so.
        page.keyboard.press("Escape")
        expect(assistant(page, 0)).to_have_attribute("data-status", "stopped", timeout=30_000)
        expect(page.locator("#stop-button")).to_be_hidden()
        stopped = len(body.text_content())
        page.wait_for_timeout(1000)
        assert len(body.text_content()) == stopped
        page.reload()
        expect(page.locator("#conn-state")).to_have_text("live", timeout=30_000)
        expect(assistant(page, 0)).to_have_attribute("data-status", "stopped", timeout=30_000)


# Opens the run and chat sockets of the studio at `base` from whatever page it runs in, says hello /
# opens the conversation, and returns the type of every message each socket received.
PROBE_SOCKETS = """async ({base, run, conversation}) => {
    function probe(path, first, wanted) {
        return new Promise((resolve) => {
            const got = [];
            const done = () => { try { ws.close(); } catch (err) {} resolve(got); };
            const ws = new WebSocket(base + path);
            ws.onopen = () => ws.send(JSON.stringify(first));
            ws.onmessage = (e) => {
                try { got.push(JSON.parse(e.data).type); } catch (err) { got.push("unreadable"); }
                if (got.includes(wanted)) done();
            };
            ws.onclose = () => resolve(got);
            setTimeout(done, 5000);
        });
    }
    return {
        runs: await probe(`/ws/runs/${run}/`, {type: "hello", after: null}, "snapshot"),
        chat: await probe("/ws/chat/", {type: "open", conversation}, "conversation"),
    };
}"""


@contextmanager
def other_site():
    """A page on another port of the same host, as any local web app or dev server would serve it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>another site</title><p>nothing to see</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_port_cannot_read_the_studios_sockets(manage_env, tmp_path):
    """Cross-site WebSocket hijacking: the browser sends the studio's session cookie (same site: the
    port does not count) to sockets opened by a page of another port. Before the origin check of
    studio/origin.py such a page received the person's conversation and the run's snapshot."""
    chromium = require_chromium()
    from playwright.sync_api import sync_playwright

    with StudioServer(manage_env, tmp_path / "studio") as studio, other_site() as elsewhere, \
            sync_playwright() as playwright:
        register_run(studio, "origin-run")
        created = studio.manage("shell", "-c", (
            "from django.contrib.auth.models import User; from studio.models import Conversation, Message; "
            f"c = Conversation.objects.create(owner=User.objects.get(username={studio.username!r}), title='private'); "
            "Message.objects.create(conversation=c, role='user', content='a secret'); print(c.id)"))
        conversation = int(created.stdout.strip().splitlines()[-1])
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        try:
            log_in(page, studio)
            target = {"base": f"ws://127.0.0.1:{studio.port}", "run": "origin-run", "conversation": conversation}

            page.goto(studio.url("/chat/"))  # the same code from the studio's own page works
            own = page.evaluate(PROBE_SOCKETS, target)
            assert "snapshot" in own["runs"] and "conversation" in own["chat"], own

            page.goto(elsewhere)
            assert page.url.startswith(elsewhere)
            foreign = page.evaluate(PROBE_SOCKETS, target)
            assert foreign == {"runs": [], "chat": []}, f"a page of {elsewhere} read the studio's sockets: {foreign}"
        finally:
            browser.close()
        assert "Traceback" not in studio.logs["daphne"].read_text()
