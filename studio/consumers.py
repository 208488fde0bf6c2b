"""WebSocket consumers (served by daphne; routes in studio/routing.py).

RunConsumer streams one run to its page: ws://<host>/ws/runs/<run_id>/

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
import logging
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from studio.actions import run_group
from studio.live import Follower
from studio.models import Run

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
