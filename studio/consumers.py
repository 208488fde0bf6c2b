"""WebSocket consumers (served by daphne; routes in studio/routing.py).

RunConsumer streams one run to its page: ws://<host>/ws/runs/<run_id>/
ChatConsumer serves the chat page: ws://<host>/ws/chat/ (protocol in its docstring)

Client -> server (JSON):
    {"type": "hello", "after": null | N}   first message: null = send a snapshot; N = the last seq
                                           the page has: send every event after it (a reconnect)
    {"type": "pong"}                       answer to a ping (any message counts)
    {"type": "ping"}                       answered with {"type": "pong"}
Server -> client:
    {"type": "snapshot", "run": RUN, "events": [...], "last_seq": N, "downsampled": {...}, "log": {...}, "report_html": "..."}
    {"type": "events", "events": [...], "last_seq": N}     new events, seq strictly increasing
    {"type": "run", "run": RUN}                            status, stages, progress or possible actions changed
    {"type": "log", "stage": S, "lines": [...], "reset": bool}
    {"type": "report", "html": "..."}                      the report card, rendered and sanitized
    {"type": "ping", "time": T}                            every HEARTBEAT_SECONDS
    {"type": "error", "message": "...", "field": F}        a bad message from the page; the socket keeps serving
    {"type": "pong"}
Close codes: 4401 not logged in, 4404 no such run, 4400 a frame that is not a JSON object (binary,
too big, not JSON): the page is broken, retrying cannot help.

Every message from a page is checked against its schema in studio/protocol.py before a
handler sees it (ids, texts, settings); a bad field gets an error naming it.

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
import logging
import threading
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from studio import chat, protocol
from studio.ingest import run_group
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

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        if self.follower is None:
            return  # refused at connect (4401, 4404): whatever arrives before the close is ignored
        try:
            kind, fields = protocol.parse(text_data, bytes_data, protocol.RUN_MESSAGES, max_chars=4096)
        except protocol.ProtocolError as e:
            await self.send_json({"type": "error", "message": str(e), "field": e.field})
            if e.close:
                await self.close(code=4400)
            return
        if kind == "ping":
            await self.send_json({"type": "pong"})
        elif kind == "hello":
            if self.tasks:
                await self.send_json({"type": "error", "message": "hello was already sent on this connection", "field": None})
                return
            try:
                messages = await database_sync_to_async(self.follower.hello)(fields["after"])
            except Run.DoesNotExist:
                await self.close(code=4404)  # deleted since the socket opened
                return
            for message in messages:
                await self.send_json(message)
            self.tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._heartbeat())]

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
    Close codes: 4401 not logged in, 4400 a frame that is not a JSON object (binary, too big, not JSON).
    A message of unknown type or with a bad field (checked in studio/protocol.py) gets an error
    naming the field, and the socket keeps serving.

    Big payloads come in frames under daphne's 1 MiB limit (studio.chat.open_frames):
        conversation {..., more} then messages {conversation, messages, more} until more is false;
        probs {message, offset, probs} after a "done" or a conversation whose token probabilities
        did not fit one frame: they go into message.probs from `offset` on.

    Conversations are private: every id in a message is looked up among the person's own
    conversations before anything is done with it (a running answer included), and someone else's
    id gets the same error as one that does not exist.

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
        kind = None
        try:
            kind, fields = protocol.parse(text_data, bytes_data, protocol.CHAT_MESSAGES, limit)
            await getattr(self, self.HANDLERS[kind])(fields)
        except ChatError as e:
            await self._send_quietly({"type": "error", "error": str(e), "field": e.field})
            if isinstance(e, protocol.ProtocolError) and e.close:
                await self.close(code=4400)
        except Exception:
            # A bug must not take the socket down (and an answer streaming on it): say so and keep serving.
            log.exception("chat message of type %s failed", kind)  # not its text: conversations are private
            await self._send_quietly({"type": "error", "error": "the server failed on this message (it is logged); "
                                      "reload the page if it keeps happening", "field": None})

    HANDLERS = {"open": "do_open", "send": "do_send", "edit": "do_edit", "regenerate": "do_regenerate",
                "continue": "do_continue", "stop": "do_stop", "select": "do_select", "settings": "do_settings",
                "ping": "do_ping", "pong": "do_pong"}
    assert HANDLERS.keys() == protocol.CHAT_MESSAGES.keys()

    async def do_ping(self, fields):
        await self.send_json({"type": "pong"})

    async def do_pong(self, fields):
        pass  # the answer to our ping: any message shows the link works

    # Handlers get the message's fields checked by studio/protocol.py (ids are ints in range, texts are str).

    async def do_open(self, fields):
        for frame in await database_sync_to_async(chat.open_frames)(self.user, fields["conversation"], set(LIVE)):
            await self.send_json(frame)

    async def do_send(self, fields):
        self._require_idle()
        conv, created, question, answer = await database_sync_to_async(chat.start_exchange)(
            self.user, fields["conversation"], fields["parent"], fields["text"], fields["settings"])
        if created:
            await self.send_json({"type": "created", "conversation": await self._conversation_json(conv)})
        await self._begin(conv, question, answer)

    async def do_edit(self, fields):
        self._require_idle()
        conv, question, answer = await database_sync_to_async(chat.start_edit)(self.user, fields["message"], fields["text"])
        await self._begin(conv, question, answer)

    async def do_regenerate(self, fields):
        self._require_idle()
        conv, answer = await database_sync_to_async(chat.start_regenerate)(self.user, fields["message"])
        await self._begin(conv, None, answer)

    async def do_continue(self, fields):
        self._require_idle()
        # Whose answer it is comes first: another person's id must not reach the generation writing it.
        answer = await database_sync_to_async(chat.get_message)(self.user, fields["message"])
        other = LIVE.get(answer.id)
        if other is not None and other is not self and other.user.pk == self.user.pk:
            await other._stop("interrupted")  # the same answer open in another tab: this page takes it over
        conv, answer = await database_sync_to_async(chat.prepare_continue)(self.user, answer.id, set(LIVE))
        self._start_job(conv, answer)

    async def do_stop(self, fields):
        await self._stop("stopped")  # only this socket's own answer

    async def do_select(self, fields):
        conv = await database_sync_to_async(chat.select_version)(self.user, fields["conversation"], fields["message"])
        await self.send_json({"type": "leaf", "conversation": conv.id, "leaf": conv.leaf_id})

    async def do_settings(self, fields):
        conv = await database_sync_to_async(chat.save_settings)(self.user, fields["conversation"], fields["settings"])
        await self.send_json({"type": "settings", "conversation": conv.id, "settings": chat.conversation_settings(conv)})

    def _require_idle(self):
        if self.job is not None:
            raise ChatError("an answer is being written: wait for it or press Stop", None)

    # The two serializers the socket sends with: synchronous code (Markdown rendering, splitting a
    # big answer into frames, model attributes), run off the event loop like the database calls.

    async def _conversation_json(self, conv) -> dict:
        return await database_sync_to_async(chat.conversation_json)(conv)

    async def _message_frames(self, kind: str, message: Message, mode: str) -> list[dict]:
        return await database_sync_to_async(chat.message_frames)(kind, message, mode)

    async def _begin(self, conv, question, answer):
        for message in ([question] if question is not None else []) + [answer]:
            for frame in await self._message_frames("message", message, conv.mode):
                await self.send_json(frame)
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
        for frame in await self._message_frames("done", message, job.mode):
            await self._send_quietly(frame)

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
