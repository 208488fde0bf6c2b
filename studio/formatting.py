"""How numbers, durations and events are written for people (pages and `runjob`)."""

from __future__ import annotations

import json

from pipeline.report import format_duration  # noqa: F401 (one formatter for the pages, runjob and the report)


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


def split_fields(fields: dict, max_items: int = 8):
    """Split event values into scalars, tables (lists of dicts) and lists, for display.

    Long lists are cut to `max_items` with a note of how many were left out.
    """
    scalars, tables, lists = {}, {}, {}
    for key, value in fields.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables[key] = value
        elif isinstance(value, list) and len(value) > 1:
            shown = [format_value(v, width=120) for v in value[:max_items]]
            if len(value) > max_items:
                shown.append(f"… ({len(value) - max_items} more)")
            lists[key] = shown
        else:
            scalars[key] = value
    return scalars, tables, lists


def event_lines(event: dict, width: int = 40) -> list[str]:
    """An event as terminal lines: scalars on the first, tables and lists indented below."""
    scalars, tables, lists = split_fields(event_fields(event))
    lines = [format_fields(scalars, width)]
    for key, rows in tables.items():
        lines.append(f"  {key}:")
        lines += [f"    {format_fields(row, width)}" for row in rows]
    for key, items in lists.items():
        lines.append(f"  {key}:")
        lines += [f"    {item}" for item in items]
    return lines
