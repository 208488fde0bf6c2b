"""From a run's events.jsonl into the database, and from there to the pages.

    ingest_events(run)            # store the events written since the last call as RunEvent rows
    summarize(summary, events)    # fold events into Run.summary (progress, min/max/last of key metrics)
    notify(run)                   # wake the run's WebSocket consumers (with Redis)

The supervisor calls ingest_events as its stage runs; the run page's
consumer (studio/consumers.py) reads the rows, and notify() tells it to look
now instead of at its next poll.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from django.conf import settings

from studio.models import Run, RunEvent
from pipeline.events import tail_events

log = logging.getLogger(__name__)

# The metrics the dashboard shows per run (min/max/last), by event kind and field.
SUMMARY_METRICS = {"metric": ("loss", "smooth_loss", "tok_per_sec", "mfu"), "eval": ("val_bpb",)}


def ingest_events(run: Run, on_event: Callable[[dict], None] | None = None) -> list[dict]:
    """Store events written since run.events_offset; return them (and pass each to on_event).

    Idempotent: rows are unique per (run, seq), so reading the same lines
    again (e.g. after a crash between insert and offset update) adds nothing.
    """
    events, offset, lines = tail_events(run.run_dir, run.events_offset, run.events_seq)
    if events:
        RunEvent.objects.bulk_create(
            [
                RunEvent(
                    run_id=run.pk,
                    seq=e["seq"],
                    stage=str(e.get("stage", ""))[:64],
                    kind=str(e.get("kind", ""))[:32],
                    step=int_or_none(e.get("step")),
                    time=e["time"] if finite(e.get("time")) else None,
                    data=_json_safe(e),
                )
                for e in events
            ],
            ignore_conflicts=True,
            batch_size=500,
        )
    if offset != run.events_offset:
        run.summary = summarize(run.summary, events)
        Run.objects.filter(pk=run.pk).update(events_offset=offset, events_seq=lines, summary=run.summary)
        run.events_offset, run.events_seq = offset, lines
        notify(run)
    if on_event:
        for event in events:
            on_event(event)
    return events


def summarize(summary: dict, events: list[dict]) -> dict:
    """Fold new events into a run's summary: progress of the latest stage and min/max/last of key metrics."""
    summary = {"metrics": {}, "totals": {}, **(summary or {})}
    for e in events:
        stage, kind = e.get("stage", ""), e.get("kind")
        if kind == "setup" and int_or_none(e.get("num_iterations")):
            summary["totals"][stage] = int(e["num_iterations"])
        if kind == "metric":
            step, total = int_or_none(e.get("step")), summary["totals"].get(stage)
            fraction = e.get("fraction") if finite(e.get("fraction")) else (step / total if step is not None and total else None)
            summary["progress"] = {"stage": stage, "step": step, "total": total, "fraction": fraction}
        for name in SUMMARY_METRICS.get(kind, ()):
            value = e.get(name)
            if not finite(value):
                continue
            m = summary["metrics"].setdefault(name, {})
            m.update(last=value, step=e.get("step"), stage=stage,
                     min=min(value, m.get("min", value)), max=max(value, m.get("max", value)))
    return summary


def finite(value) -> bool:
    """A real number (not a bool, NaN or infinity), as event fields are checked before use."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_or_none(value):
    return int(value) if finite(value) and abs(value) < 2**31 else None


def _json_safe(value):
    # A loss that went NaN is worth keeping, but NaN is not JSON: SQLite's
    # JSON check would reject the row (and ignore_conflicts would drop it silently).
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --- live updates ----------------------------------------------------------------------------


def notify(run: Run) -> None:
    """Wake the run's WebSocket consumers at once (only with Redis: the
    in-memory layer cannot cross processes, and consumers poll anyway)."""
    if not settings.REDIS_URL:
        return
    try:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        async_to_sync(get_channel_layer().group_send)(run_group(run.pk), {"type": "run.wake"})
    except Exception as e:  # live updates are a convenience; training goes on
        log.warning("run %s: could not notify consumers: %s", run.pk, e)


def run_group(run_id: str) -> str:
    """The channel-layer group of a run's page sockets."""
    return f"run-{run_id}"
