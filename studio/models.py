"""What the studio remembers about runs.

The run directory (config.json, events.jsonl, logs/, checkpoints/) is the
source of truth; these rows are an index of it that pages can query, plus the
state only the orchestrator knows (status, pids, exit codes, timings).
State changes go through studio/actions.py.
"""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from studio.formatting import event_fields
from trainer.events import stage_log_path


def new_run_id() -> str:
    """Sortable, unique and safe as a folder name: 20261124-101500-3fa9c1."""
    return f"{timezone.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def tail_lines(path: Path, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` lines of a text file (reads at most `max_bytes` from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line is probably cut
    return lines[-n:] if n else []


def seconds_between(start, end) -> float | None:
    if start is None:
        return None
    return ((end or timezone.now()) - start).total_seconds()


class Run(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    id = models.CharField(primary_key=True, max_length=64, default=new_run_id, editable=False)
    name = models.CharField(max_length=200, blank=True)
    preset = models.CharField(max_length=64)
    config = models.JSONField(help_text="Resolved configuration (the same as config.json).")
    directory = models.CharField(
        max_length=1024, blank=True, help_text="Absolute run directory; empty means NANOSTUDIO_RUNS_DIR/<id>."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    cancel_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Which process supervises the run (a queue worker or `runjob`), so a run
    # whose supervisor died can be told apart from one that is still going.
    supervisor_pid = models.IntegerField(null=True, blank=True)
    supervisor_host = models.CharField(max_length=255, blank=True)
    # Byte offset into events.jsonl up to which events are stored as RunEvent rows.
    events_offset = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.name or self.id

    def get_absolute_url(self):
        return reverse("studio:run_detail", args=[self.id])

    @property
    def run_dir(self) -> Path:
        return Path(self.directory) if self.directory else Path(settings.NANOSTUDIO_RUNS_DIR) / self.id

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish (or to now while running)."""
        if self.status == self.Status.QUEUED:
            return None
        return seconds_between(self.started_at, self.finished_at)

    def latest_events(self, kinds=("metric", "eval", "result"), limit=20):
        return self.events.filter(kind__in=kinds).order_by("-seq")[:limit]


class StageRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"
        SKIPPED = "skipped"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="stages")
    name = models.CharField(max_length=64)
    order = models.PositiveSmallIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    argv = models.JSONField(default=list, blank=True, help_text="The command line, as run.")
    pid = models.IntegerField(null=True, blank=True, help_text="Process (and process group) id of the stage.")
    exit_code = models.IntegerField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "order"]
        constraints = [models.UniqueConstraint(fields=["run", "name"], name="unique_stage_per_run")]

    def __str__(self):
        return f"{self.run_id}/{self.name}"

    @property
    def duration(self) -> float | None:
        return seconds_between(self.started_at, self.finished_at)

    @property
    def log_path(self) -> Path:
        return stage_log_path(self.run.run_dir, self.name)

    def log_tail(self, n: int = 50) -> list[str]:
        return tail_lines(self.log_path, n)

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)


class RunEvent(models.Model):
    """One line of events.jsonl, stored for the pages. `seq` is its line number."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveIntegerField()
    stage = models.CharField(max_length=64, blank=True)
    kind = models.CharField(max_length=32)
    time = models.FloatField(null=True, blank=True, help_text="Unix time written by the stage.")
    data = models.JSONField(help_text="The whole event as written.")

    class Meta:
        ordering = ["run", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="unique_event_seq_per_run")]
        indexes = [models.Index(fields=["run", "kind", "seq"], name="runevent_run_kind_seq")]

    def __str__(self):
        return f"{self.run_id}#{self.seq} {self.stage}.{self.kind}"

    @property
    def fields(self) -> dict:
        """The event's own values, without the envelope every event has."""
        return event_fields(self.data)
