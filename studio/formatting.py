"""How numbers, durations and events are written for people (pages and `runjob`)."""

from __future__ import annotations

import json


def format_duration(seconds: float | None) -> str:
    """0.4 s, 12.3 s, 4 m 05 s, 3 h 07 m, 2 d 04 h."""
    if seconds is None:
        return ""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} m"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def format_value(value, width: int = 40) -> str:
    """A compact rendering of one event value: 4 significant digits for floats."""
    if isinstance(value, bool) or value is None:
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_fields(fields: dict, width: int = 40) -> str:
    return " ".join(f"{key}={format_value(value, width)}" for key, value in fields.items())


ENVELOPE = ("time", "stage", "kind", "seq")


def event_fields(event: dict) -> dict:
    """An event without the keys every event has."""
    return {k: v for k, v in event.items() if k not in ENVELOPE}
