"""What the run page's WebSocket sends: snapshots, new events, state, log lines, the report.

The consumer (studio/consumers.py) is a thin async shell around these
synchronous functions; they read only the database and the run directory, so
they work the same in the embedded mode (the consumer polls) and with Redis
(the supervisor's group_send wakes the consumer early). The protocol itself is
described in consumers.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from django.db.models import Max
from django.db.models.functions import Mod
from django.urls import reverse

from studio.models import Run, RunEvent, StageRun, tail_lines
from studio.render import markdown_html
from pipeline.events import stage_log_path

SNAPSHOT_MAX_METRICS = 4000  # metric points per stage in a snapshot, at most (about)
SNAPSHOT_FULL_TAIL = 500  # the most recent metric points always come at full rate
MAX_REPLAY = 20000  # a reconnect missing more than this gets a fresh snapshot instead
EVENTS_PER_MESSAGE = 2000
# daphne (autobahn) refuses to send a WebSocket message over 1 MiB: a long
# history goes out as a snapshot followed by `events` messages of about this size.
MESSAGE_BYTES = 256 * 1024
LOG_LINES = 200  # log lines sent when a page connects or the running stage changes
LOG_CHUNK = 64 * 1024  # most bytes of new log read per poll


def iso(dt):
    return dt.isoformat() if dt else None


def run_state(run: Run) -> dict:
    """The RUN object of the protocol: status, stages, progress and the actions possible now."""
    stages = list(run.stages.order_by("order"))
    running = run.status == Run.Status.RUNNING
    stopping = run.cancel_requested or run.kill_requested

    def url(name, ok):
        return reverse(f"studio:{name}_run", args=[run.id]) if ok else None

    return {
        "id": run.id,
        "name": run.name,
        "preset": run.preset,
        "status": run.display_status,
        "error": run.error,
        "cancel_requested": run.cancel_requested,
        "kill_requested": run.kill_requested,
        "pause_requested": run.pause_requested,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "started_ts": run.started_at.timestamp() if run.started_at else None,
        "duration": run.duration,
        "total_batch_size": run.config.get("total_batch_size"),
        "stages": [
            {
                "name": s.name, "order": s.order, "status": s.status, "exit_code": s.exit_code, "note": s.note,
                "gpus": s.gpus, "started_at": iso(s.started_at), "finished_at": iso(s.finished_at), "duration": s.duration,
            }
            for s in stages
        ],
        "progress": run.progress,
        "actions": {
            "pause": url("pause", running and not run.pause_requested and not stopping),
            "resume": url("resume", run.is_resumable),
            "cancel": url("cancel", run.is_active and not stopping),
            "kill": url("kill", running and not run.kill_requested),
            "delete": url("delete", not run.is_active),
        },
    }


def event_dict(row: RunEvent) -> dict:
    return {**row.data, "seq": row.seq}


def snapshot_events(run: Run) -> tuple[list[dict], dict]:
    """Every event of the run, with metric events down-sampled per stage to about SNAPSHOT_MAX_METRICS.

    Down-sampling keeps every k-th step (so the x spacing stays even) plus the
    last SNAPSHOT_FULL_TAIL points, which live updates then continue. The
    trainer computes smooth_loss on every step, so the smoothed curve shown
    is smoothed before down-sampling.
    """
    events = RunEvent.objects.filter(run=run)
    rows = list(events.exclude(kind="metric").order_by("seq"))
    stride_used, total = 1, 0
    for stage in events.filter(kind="metric").values_list("stage", flat=True).distinct().order_by():
        metrics = events.filter(kind="metric", stage=stage)
        n = metrics.count()
        total += n
        if n <= SNAPSHOT_MAX_METRICS:
            rows += list(metrics)
            continue
        stride = math.ceil(n / (SNAPSHOT_MAX_METRICS - SNAPSHOT_FULL_TAIL))
        stride_used = max(stride_used, stride)
        tail_from = metrics.order_by("-seq").values_list("seq", flat=True)[SNAPSHOT_FULL_TAIL - 1]
        sampled = metrics.filter(step__isnull=False).annotate(phase=Mod("step", stride)).filter(phase=0, seq__lt=tail_from)
        rows += list(sampled) + list(metrics.filter(seq__gte=tail_from))
    rows.sort(key=lambda r: r.seq)
    return [event_dict(r) for r in rows], {"metric_stride": stride_used, "metric_total": total}


def chunked(events: list[dict], budget: int | None = None):
    """Consecutive runs of events whose JSON stays around `budget` bytes (at least one event each)."""
    budget = budget or MESSAGE_BYTES
    chunk, size = [], 0
    for event in events:
        n = len(json.dumps(event, separators=(",", ":")))
        if chunk and size + n > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(event)
        size += n
    if chunk:
        yield chunk


@dataclass
class Follower:
    """One page's view of one run: what it has been sent so far."""

    run_id: str
    last_seq: int = 0
    run_json: dict | None = None
    log_stage: str | None = None
    log_offset: int = 0
    log_partial: bytes = b""
    report_key: tuple | None = None
    pending: list = field(default_factory=list)

    def run(self) -> Run:
        return Run.objects.get(pk=self.run_id)

    def hello(self, after: int | None) -> list[dict]:
        """The answer to a page's hello: a snapshot, or the events after `after`."""
        run = self.run()
        if after is not None:
            last = run.events.aggregate(m=Max("seq"))["m"] or 0
            if last - after <= MAX_REPLAY and after <= last:
                self.last_seq = after
                self.run_json = None  # always send the state after a replay
                return self.poll(run)
        return self.snapshot(run)

    def snapshot(self, run: Run) -> list[dict]:
        """A snapshot message, then `events` messages with the rest of a history too long for one."""
        events, sampling = snapshot_events(run)
        chunks = list(chunked(events)) or [[]]
        self.last_seq = events[-1]["seq"] if events else 0
        self.run_json = run_state(run)
        log = self._log_reset(run)
        first = {
            "type": "snapshot", "run": self.run_json, "events": chunks[0],
            "last_seq": chunks[0][-1]["seq"] if chunks[0] else 0,
            "downsampled": sampling, "log": {"stage": log["stage"], "lines": log["lines"]},
            "report_html": self._report(run, force=True) or "",
        }
        return [first] + [{"type": "events", "events": c, "last_seq": c[-1]["seq"]} for c in chunks[1:]]

    def poll(self, run: Run | None = None) -> list[dict]:
        """Messages for whatever changed since the last call."""
        run = run or self.run()
        out = []
        rows = list(run.events.filter(seq__gt=self.last_seq).order_by("seq")[:EVENTS_PER_MESSAGE])
        if rows:
            self.last_seq = rows[-1].seq
            out += [{"type": "events", "events": c, "last_seq": c[-1]["seq"]} for c in chunked([event_dict(r) for r in rows])]
        state = run_state(run)
        if state != self.run_json:
            self.run_json = state
            out.append({"type": "run", "run": state})
        out += self._log(run)
        html = self._report(run)
        if html is not None:
            out.append({"type": "report", "html": html})
        return out

    # --- log tail of the stage that runs (or ran last) ---

    def _log_stage(self, run: Run) -> StageRun | None:
        return run.stages.exclude(started_at=None).order_by("-order").first()

    def _log_reset(self, run: Run) -> dict:
        stage = self._log_stage(run)
        self.log_stage = stage.name if stage else None
        self.log_partial = b""
        if stage is None:
            self.log_offset = 0
            return {"type": "log", "stage": None, "lines": [], "reset": True}
        path = stage_log_path(run.run_dir, stage.name)
        try:
            self.log_offset = os.path.getsize(path)
        except OSError:
            self.log_offset = 0
        return {"type": "log", "stage": stage.name, "lines": tail_lines(path, LOG_LINES), "reset": True}

    def _log(self, run: Run) -> list[dict]:
        stage = self._log_stage(run)
        if (stage.name if stage else None) != self.log_stage:
            return [self._log_reset(run)]
        if stage is None:
            return []
        try:
            with open(stage_log_path(run.run_dir, stage.name), "rb") as f:
                f.seek(self.log_offset)
                data = f.read(LOG_CHUNK)
        except OSError:
            return []
        if not data:
            return []
        self.log_offset += len(data)
        data = self.log_partial + data
        complete, _, self.log_partial = data.rpartition(b"\n")
        if not complete and not _:
            return []
        lines = complete.decode("utf-8", "replace").split("\n")
        return [{"type": "log", "stage": stage.name, "lines": lines, "reset": False}]

    # --- report card ---

    def _report(self, run: Run, force: bool = False) -> str | None:
        path = run.run_dir / "report.md"
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key == self.report_key and not force:
            return None
        self.report_key = key
        if key is None:
            return "" if force else None
        return str(markdown_html(path.read_text(encoding="utf-8", errors="replace")))
