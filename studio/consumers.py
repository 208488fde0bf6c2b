"""WebSocket consumers (served by daphne; routes in studio/routing.py).

RunConsumer streams one run to its page: ws://<host>/ws/runs/<run_id>/
ChatConsumer serves the chat page: ws://<host>/ws/chat/ (protocol in its docstring)

Client -> server (JSON):
    {"type": "hello", "after": null | N}   first message: null = send a snapshot; N = the last seq
                                           the page has: send every event after it (a reconnect)
    {"type": "pong"}                       answer to a ping (any message counts)
Server -> client:
    {"type": "snapshot", "run": RUN, "events": [...], "last_seq": N, "downsampled": {...}, "log": {...}, "report_html": "..."}
    {"type": "events", "events": [...], "last_seq": N}     new events, seq strictly increasing
    {"type": "run", "run": RUN}                            status, stages, progress or possible actions changed
    {"type": "log", "stage": S, "lines": [...], "reset": bool}
    {"type": "report", "html": "..."}                      the report card, rendered and sanitized
    {"type": "ping", "time": T}                            every HEARTBEAT_SECONDS
    {"type": "error", "message": "..."}                    a bad message from the page
Close codes: 4401 not logged in, 4404 no such run, 4400 protocol error.

Every event carries its sequence number (its line in events.jsonl), so a
page opened late, refreshed or reconnected after a dropped network shows the
complete curve with no gaps and no duplicates: the snapshot replaces what it
had, and replays continue exactly after its last seq.

Where updates come from: the run's supervisor (queue worker or `runjob`)
stores events in the database as the stages write them. The in-memory
channel layer cannot carry messages between processes, so the consumer polls
the database every POLL_SECONDS; with Redis configured the supervisor's
group_send("run-<id>", {"type": "run.wake"}) wakes it at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from studio import chat
from studio.actions import run_group
from studio.chat import ChatError
from studio.live import Follower
from studio.models import Message, Run

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 10


class RunConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        self.follower = None
        self.tasks = []
        self.group = None
        await self.accept()  # accept first so the page receives the close code and reason
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        if not await database_sync_to_async(Run.objects.filter(pk=run_id).exists)():
            await self.close(code=4404)
            return
        self.follower = Follower(run_id)
        self.wake = asyncio.Event()
        if self.channel_layer is not None:
            self.group = run_group(run_id)
            await self.channel_layer.group_add(self.group, self.channel_name)

    async def disconnect(self, code):
        for task in self.tasks:
            task.cancel()
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if self.follower is None:
            return
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "pong":
            return
        if kind != "hello":
            await self.send_json({"type": "error", "message": f"unknown message type {kind!r}; send hello or pong"})
            return
        after = content.get("after")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            await self.send_json({"type": "error", "message": "hello.after must be null or a sequence number >= 0"})
            await self.close(code=4400)
            return
        if self.tasks:
            await self.send_json({"type": "error", "message": "hello was already sent on this connection"})
            return
        for message in await database_sync_to_async(self.follower.hello)(after):
            await self.send_json(message)
        self.tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._heartbeat())]

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # A page sends small JSON text frames only; anything else is a client bug or abuse.
        if bytes_data is not None or text_data is None or len(text_data) > 4096:
            await self.close(code=4400)
            return
        try:
            await super().receive(text_data=text_data, **kwargs)
        except ValueError:
            await self.send_json({"type": "error", "message": "messages must be JSON objects"})

    async def run_wake(self, message):
        self.wake.set()

    async def _follow(self):
        poll = database_sync_to_async(self.follower.poll)
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                messages = await poll()
            except Run.DoesNotExist:
                await self.close(code=4404)  # deleted while the page was open
                return
            except Exception:
                log.exception("run page poll failed for %s", self.follower.run_id)
                continue
            for message in messages:
                await self.send_json(message)

    async def _heartbeat(self):
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            await self.send_json({"type": "ping", "time": time.time()})


# Answers being written by this process: message id -> the consumer writing it.
LIVE: dict[int, "ChatConsumer"] = {}
FLUSH_SECONDS = 0.05  # deltas are batched: at most ~20 messages a second per answer
SAVE_SECONDS = 1.0  # an answer in progress is saved this often (a crash loses at most this much)


class _Job:
    """One answer being generated for this socket."""

    def __init__(self, message: Message, mode: str):
        self.message_id = message.id
        self.mode = mode
        self.stop = threading.Event()
        self.reason = ""  # "stopped" (the Stop button) or "interrupted" (the page went away)
        self.parts = [dict(p) for p in message.parts]
        self.token_ids = list(message.token_ids)
        self.probs = list(message.probs)
        self.task: asyncio.Task | None = None
        self.saved = False  # the final state is stored

    def apply(self, deltas: list[list]) -> None:
        for index, kind, text in deltas:
            if index == len(self.parts):
                self.parts.append({"type": kind, "text": ""})
            self.parts[index]["text"] += text


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """The chat page's socket: conversations, streamed answers, Stop.

    Client -> server (JSON; ids are numbers):
        {"type": "open", "conversation": ID}
        {"type": "send", "conversation": ID|null, "parent": MSG|null, "text": "...", "settings": SETTINGS}
        {"type": "edit", "message": USER_MSG, "text": "..."}      a new version of a question, answered
        {"type": "regenerate", "message": ANSWER}                  a new version of an answer
        {"type": "continue", "message": ANSWER}                    go on with an interrupted answer
        {"type": "stop"}                                           end this socket's answer now
        {"type": "select", "conversation": ID, "message": MSG}     show another version (branch)
        {"type": "settings", "conversation": ID, "settings": SETTINGS}
        {"type": "ping"} | {"type": "pong"}                        (pong answers the server's ping)
    Server -> client:
        conversation {conversation, messages, leaf, generating} | created {conversation} |
        message {message} | leaf {conversation, leaf} | waiting {message, position} |
        loading {message} | started {message} | delta {message, parts: [[i, type, text]], probs} |
        done {message} | settings {conversation, settings} | error {error, field} | pong |
        ping {time} (at once on connect, then every HEARTBEAT_SECONDS)
    Close codes: 4401 not logged in, 4400 a message that is not JSON, too big, or of unknown type.

    One answer per socket at a time. Stop ends it at once (also while waiting for a model slot
    or loading); a closed socket ends it too, marked "interrupted", and the page continues it
    when it opens the conversation again (a refresh mid-answer keeps streaming).
    """

    async def connect(self):
        self.job: _Job | None = None
        self.heartbeat = None
        self.user = None
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.user = user
        # A ping at once and then every HEARTBEAT_SECONDS: the page knows the link is live before it
        # opens anything, and a silent link for 30 s means a dead one (static/js/live.js).
        self.heartbeat = asyncio.create_task(self._heartbeat())

    async def _heartbeat(self):
        while True:
            await self._send_quietly({"type": "ping", "time": time.time()})
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def disconnect(self, code):
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        await self._stop("interrupted")

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        if self.user is None:
            return  # refused at connect (4401): whatever arrives before the close is ignored
        limit = chat.limits()["max_message_chars"] * 6 + 4096  # JSON escapes a character in at most 6 bytes
        if bytes_data is not None or text_data is None or len(text_data) > limit:
            await self.close(code=4400)
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            content = None
        if not isinstance(content, dict) or content.get("type") not in self.HANDLERS:
            await self.send_json({"type": "error", "error": "messages must be JSON objects with a known type", "field": None})
            await self.close(code=4400)
            return
        try:
            await getattr(self, self.HANDLERS[content["type"]])(content)
        except ChatError as e:
            await self.send_json({"type": "error", "error": str(e), "field": e.field})

    HANDLERS = {"open": "do_open", "send": "do_send", "edit": "do_edit", "regenerate": "do_regenerate",
                "continue": "do_continue", "stop": "do_stop", "select": "do_select", "settings": "do_settings",
                "ping": "do_ping", "pong": "do_pong"}

    async def do_ping(self, content):
        await self.send_json({"type": "pong"})

    async def do_pong(self, content):
        pass  # the answer to our ping: any message shows the link works

    async def do_open(self, content):
        await self.send_json(await database_sync_to_async(chat.open_payload)(self.user, content.get("conversation"), set(LIVE)))

    async def do_send(self, content):
        self._require_idle()
        conv, created, question, answer = await database_sync_to_async(chat.start_exchange)(
            self.user, content.get("conversation"), content.get("parent"), content.get("text"), content.get("settings"))
        if created:
            await self.send_json({"type": "created", "conversation": await self._json(chat.conversation_json, conv)})
        await self._begin(conv, question, answer)

    async def do_edit(self, content):
        self._require_idle()
        conv, question, answer = await database_sync_to_async(chat.start_edit)(self.user, content.get("message"), content.get("text"))
        await self._begin(conv, question, answer)

    async def do_regenerate(self, content):
        self._require_idle()
        conv, answer = await database_sync_to_async(chat.start_regenerate)(self.user, content.get("message"))
        await self._begin(conv, None, answer)

    async def do_continue(self, content):
        self._require_idle()
        try:
            other = LIVE.get(int(content.get("message")))
        except (TypeError, ValueError):
            raise ChatError("continue needs the id of an answer", "message") from None
        if other is not None and other is not self:
            await other._stop("interrupted")  # the same answer open in another tab: this page takes it over
        conv, answer = await database_sync_to_async(chat.prepare_continue)(self.user, content.get("message"), set(LIVE))
        self._start_job(conv, answer)

    async def do_stop(self, content):
        await self._stop("stopped")

    async def do_select(self, content):
        conv = await database_sync_to_async(chat.select_version)(self.user, content.get("conversation"), content.get("message"))
        await self.send_json({"type": "leaf", "conversation": conv.id, "leaf": conv.leaf_id})

    async def do_settings(self, content):
        conv = await database_sync_to_async(chat.save_settings)(self.user, content.get("conversation"), content.get("settings"))
        await self.send_json({"type": "settings", "conversation": conv.id, "settings": chat.conversation_settings(conv)})

    def _require_idle(self):
        if self.job is not None:
            raise ChatError("an answer is being written: wait for it or press Stop", None)

    async def _json(self, fn, *args):
        return await database_sync_to_async(fn)(*args)

    async def _begin(self, conv, question, answer):
        if question is not None:
            await self.send_json({"type": "message", "message": await self._json(chat.message_json, question, conv.mode)})
        await self.send_json({"type": "message", "message": await self._json(chat.message_json, answer, conv.mode)})
        await self.send_json({"type": "leaf", "conversation": conv.id, "leaf": answer.id})
        self._start_job(conv, answer)

    def _start_job(self, conv, answer):
        self.job = _Job(answer, conv.mode)
        LIVE[answer.id] = self
        self.job.task = asyncio.create_task(self._answer(self.job))

    async def _stop(self, reason: str):
        job = self.job
        if job is None or job.task is None:
            return
        job.reason = job.reason or reason
        job.stop.set()  # the generation thread ends at its next token and frees the slot
        job.task.cancel()
        try:
            await job.task
        except asyncio.CancelledError:
            pass
        if not job.saved:  # cancelled before it ran a line: store the end here
            await self._finish(job, Message.Status.INTERRUPTED if job.reason == "interrupted" else Message.Status.STOPPED,
                               "stopped", "", None)

    async def _answer(self, job: _Job):
        """Get a slot, run the generation thread, forward its tokens; always leaves the answer saved."""
        from studio.serving import get_pool, start_generation

        status, finish, error, seconds = Message.Status.ERROR, "error", "", None
        try:
            answer = await database_sync_to_async(Message.objects.select_related("conversation__run").get)(pk=job.message_id)
            request = await database_sync_to_async(chat.generation_request)(answer)
            pool = get_pool()

            def on_position(ahead: int):
                asyncio.ensure_future(self._send_quietly({"type": "waiting", "message": job.message_id, "position": ahead}))

            slot = await pool.acquire(self.user.id, request.key, on_position)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def emit(item):  # called from the generation thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the loop closed under a still running thread: nobody listens
                    job.stop.set()

            start_generation(pool, slot, request, job.stop, emit)
            end = await self._pump(job, queue)
            if end[0] == "error":
                error = end[1]
            else:
                _, finish, job.parts, job.token_ids, seconds = end
                status = Message.Status.DONE
                if finish == "stopped":  # the thread saw the stop flag before this task saw its cancel
                    status = Message.Status.INTERRUPTED if job.reason == "interrupted" else Message.Status.STOPPED
        except ChatError as e:
            error = str(e)
        except asyncio.CancelledError:
            status = Message.Status.INTERRUPTED if job.reason == "interrupted" else Message.Status.STOPPED
            finish = "stopped"
        except Exception as e:
            log.exception("chat answer %s failed", job.message_id)
            error = f"{type(e).__name__}: {e}"
        await self._finish(job, status, finish, error, seconds)

    async def _finish(self, job: _Job, status: str, finish: str, error: str, seconds: float | None):
        job.saved = True
        LIVE.pop(job.message_id, None)
        if self.job is job:
            self.job = None
        message = await database_sync_to_async(chat.save_answer)(
            job.message_id, job.parts, job.token_ids, job.probs if job.mode == "completion" else None,
            status, finish, error, seconds)
        if message is None:
            await self._send_quietly({"type": "error", "error": "the conversation was deleted while the answer was written",
                                      "field": "conversation"})
            return
        await self._send_quietly({"type": "done", "message": await self._json(chat.message_json, message, job.mode)})

    async def _pump(self, job: _Job, queue: asyncio.Queue) -> tuple:
        """Forward the thread's tokens as batched deltas, saving now and then; return its last item."""
        pending_parts, pending_probs = [], []
        last_flush = last_save = time.monotonic()
        save = database_sync_to_async(chat.save_answer)
        while True:
            wait = FLUSH_SECONDS - (time.monotonic() - last_flush) if pending_parts or pending_probs else None
            try:
                item = await (asyncio.wait_for(queue.get(), max(wait, 0)) if wait is not None else queue.get())
            except asyncio.TimeoutError:
                item = None
            if item is not None:
                kind = item[0]
                if kind in ("end", "error"):
                    if pending_parts or pending_probs:
                        await self._send_quietly({"type": "delta", "message": job.message_id, "parts": pending_parts, "probs": pending_probs})
                    return item
                if kind in ("loading", "started"):
                    await self._send_quietly({"type": kind, "message": job.message_id})
                    continue
                _, token, deltas, probs = item
                if token is not None:
                    job.token_ids.append(token)
                job.apply(deltas)
                pending_parts.extend(deltas)
                if probs is not None:
                    job.probs.append(probs)
                    pending_probs.append(probs)
            now = time.monotonic()
            if (pending_parts or pending_probs) and now - last_flush >= FLUSH_SECONDS:
                await self._send_quietly({"type": "delta", "message": job.message_id, "parts": pending_parts, "probs": pending_probs})
                pending_parts, pending_probs, last_flush = [], [], now
            if now - last_save >= SAVE_SECONDS:
                saved = await save(job.message_id, job.parts, job.token_ids, job.probs if job.mode == "completion" else None,
                                   Message.Status.STREAMING)
                if saved is None:  # the conversation was deleted: stop writing into nothing
                    job.stop.set()
                    return ("error", "this conversation was deleted")
                last_save = now

    async def _send_quietly(self, message: dict):
        """Send unless the socket is gone (an answer still gets saved after its page closed)."""
        try:
            await self.send_json(message)
        except Exception:
            pass
