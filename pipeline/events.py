"""The run directory and its append-only event stream.

Everything a run produces lives under one directory (see DESIGN.md):

    <run>/config.json      resolved configuration
    <run>/events.jsonl     one JSON object per line, written by rank 0 of each stage
    <run>/tokenizer/       tokenizer.json, tokenizer.tiktoken, token_bytes.json
    <run>/checkpoints/     per-stage checkpoints
    <run>/logs/<stage>.log stdout/stderr of each stage
    <run>/report.md        the report card

Writers append whole lines with a single write() on an O_APPEND descriptor, so
two processes appending at once never interleave inside a line, and a kill
leaves at worst one torn *last* line, which readers skip until it is complete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"
CONFIG_FILE = "config.json"


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary name in the same folder, fsync, then rename.

    rename() within one filesystem is atomic, so readers see either the old
    file or the new one, never half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class EventWriter:
    """Appends events for one stage of one run.

    Only rank 0 should write (pass enabled=False on other ranks); the object
    still accepts calls so stage code needs no `if rank == 0` everywhere.
    """

    def __init__(self, run_dir: str | os.PathLike, stage: str, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.enabled = enabled
        self.path = self.run_dir / EVENTS_FILE
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, **fields) -> dict:
        event = {"time": time.time(), "stage": self.stage, "kind": kind, **fields}
        if not self.enabled:
            return event
        line = (json.dumps(event, separators=(",", ":"), default=_jsonable) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return event

    # Small conveniences that keep stage code short and the kinds consistent.
    def start(self, **fields) -> dict:
        return self.emit("stage_start", pid=os.getpid(), host=socket.gethostname(), **fields)

    def end(self, **fields) -> dict:
        return self.emit("stage_end", **fields)

    def metric(self, **fields) -> dict:
        return self.emit("metric", **fields)

    def error(self, message: str, **fields) -> dict:
        return self.emit("error", message=message, **fields)


def _jsonable(value):
    # numpy / torch scalars and paths sneak into metrics; store them as plain values.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"event field of type {type(value).__name__} is not JSON serialisable")


def read_events(run_dir_or_file: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Read complete events from byte `offset`; return them and the new offset.

    A torn last line (a writer killed mid-write, or a write in progress) is
    left for the next call: the returned offset stops before it. Each event
    gets `seq`, its 1-based line number, so the lines before `offset` are
    counted; a follower that calls this every half second on a long run
    should use tail_events, which carries the count along instead.
    """
    events, offset, _ = tail_events(run_dir_or_file, offset, None)
    return events, offset


def tail_events(run_dir_or_file: str | os.PathLike, offset: int = 0, lines_before: int | None = 0) -> tuple[list[dict], int, int]:
    """Like read_events, given the number of lines before `offset`; returns (events, offset, lines).

    `lines` is the number of lines before the returned offset: pass it back as
    `lines_before` next time. lines_before=None counts them (reads the head).
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / EVENTS_FILE
    if not path.exists():
        return [], offset, lines_before or 0
    with open(path, "rb") as f:
        if lines_before is None:
            # Sequence numbers are line numbers: count the lines we skip.
            lines_before = f.read(offset).count(b"\n") if offset else 0
        else:
            f.seek(offset)
        data = f.read()
    seq = lines_before
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset, seq
    events = []
    for raw in data[: end + 1].split(b"\n")[:-1]:
        seq += 1
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
            if not isinstance(event, dict):
                raise ValueError("not an object")
        except ValueError:
            # A line torn by a kill and then followed by later writes: keep
            # the stream readable and say what happened instead of failing.
            event = {"kind": "corrupt", "raw": raw[:200].decode("utf-8", "replace")}
        event["seq"] = seq
        events.append(event)
    return events, offset + end + 1, seq


def stage_log_path(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / "logs" / f"{stage}.log"

