"""What the studio remembers about runs.

The run directory (config.json, events.jsonl, logs/, checkpoints/) is the
source of truth; these rows are an index of it that pages can query, plus the
state only the orchestrator knows (status, pids, exit codes, timings).
State changes go through studio/actions.py (and, while a run executes, its
supervisor: studio/supervisor.py).
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
from pipeline.events import stage_log_path


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
        PAUSED = "paused"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE = (Status.QUEUED, Status.RUNNING)
    RESUMABLE = (Status.PAUSED, Status.FAILED, Status.CANCELLED)

    id = models.CharField(primary_key=True, max_length=64, default=new_run_id, editable=False)
    name = models.CharField(max_length=200, blank=True)
    preset = models.CharField(max_length=64)
    config = models.JSONField(help_text="Resolved configuration (the same as config.json).")
    directory = models.CharField(
        max_length=1024, blank=True, help_text="Absolute run directory; empty means NANOSTUDIO_RUNS_DIR/<id>."
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs",
        help_text="Who launched it (empty for runs started with `runjob` without --user).",
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    # Requests from the pages to the run's supervisor, which polls them:
    # cancel = SIGTERM, grace, SIGKILL; kill = SIGKILL now; pause = SIGTERM and
    # wait for the stage to save a checkpoint and exit (it resumes from there).
    cancel_requested = models.BooleanField(default=False)
    kill_requested = models.BooleanField(default=False)
    pause_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Which process supervises the run (a queue worker or `runjob`), so a run
    # whose supervisor died can be told apart from one that is still going.
    supervisor_pid = models.IntegerField(null=True, blank=True)
    supervisor_host = models.CharField(max_length=255, blank=True)
    # boot id + pid + process start time: a pid reused after a reboot or by
    # another process is not mistaken for the supervisor.
    supervisor_token = models.CharField(max_length=128, blank=True)
    # When the run last became queued (created, resumed or handed to the queue
    # again): a queued run that no worker will deliver is re-enqueued when a
    # worker starts, but never one queued a moment ago, whose task is on its way.
    queued_at = models.DateTimeField(default=timezone.now)
    # Byte offset into events.jsonl up to which events are stored as RunEvent
    # rows, and the number of lines before it (= the last stored seq).
    events_offset = models.BigIntegerField(default=0)
    events_seq = models.PositiveIntegerField(default=0)
    # What the dashboard shows without reading events: the current stage's
    # progress and min/last of the key metrics, updated as events are stored.
    summary = models.JSONField(default=dict, blank=True)

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
    def is_resumable(self) -> bool:
        return self.status in self.RESUMABLE

    @property
    def display_status(self) -> str:
        """The status with the in-between states a person wants to see (pausing, stopping)."""
        if self.status == self.Status.RUNNING:
            if self.kill_requested or self.cancel_requested:
                return "stopping"
            if self.pause_requested:
                return "pausing"
        return self.status

    @property
    def current_stage(self):
        stages = list(self.stages.all())  # prefetched on the dashboard
        for stage in stages:
            if stage.status in (StageRun.Status.RUNNING, StageRun.Status.PAUSED, StageRun.Status.FAILED):
                return stage
        queued = [s for s in stages if s.status == StageRun.Status.QUEUED]
        return queued[0] if queued and self.is_active else None

    @property
    def progress(self) -> dict | None:
        """{"stage", "step", "total", "fraction"} of the stage that reports steps, from the summary."""
        return self.summary.get("progress")

    def metric_summary(self, name: str) -> dict:
        """{"last", "min", "max", "step"} of a key metric (loss, val_bpb, tok_per_sec, mfu) or {}."""
        return self.summary.get("metrics", {}).get(name, {})

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
        PAUSED = "paused"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="stages")
    name = models.CharField(max_length=64)
    order = models.PositiveSmallIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    argv = models.JSONField(default=list, blank=True, help_text="The command line, as run.")
    pid = models.IntegerField(null=True, blank=True, help_text="Process (and process group) id of the stage.")
    token = models.CharField(
        max_length=128, blank=True,
        help_text="boot id:pid:start time of the stage's process, so a reused pid is never taken for it.",
    )
    note = models.CharField(max_length=255, blank=True, help_text="What it waits for, e.g. free GPUs.")
    gpus = models.CharField(max_length=255, blank=True, help_text="CUDA_VISIBLE_DEVICES it ran with.")
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

    def append_log(self, note: str) -> None:
        """Add a `# note` line to the stage's log: what the studio did to it (waited, adopted, killed)."""
        with open(self.log_path, "a") as f:
            f.write(f"# {note}\n")

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)


class RunEvent(models.Model):
    """One line of events.jsonl, stored for the pages. `seq` is its line number."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveIntegerField()
    stage = models.CharField(max_length=64, blank=True)
    kind = models.CharField(max_length=32)
    step = models.IntegerField(null=True, blank=True, help_text="The event's step, when it has one (for down-sampling).")
    time = models.FloatField(null=True, blank=True, help_text="Unix time written by the stage.")
    data = models.JSONField(help_text="The whole event as written.")

    class Meta:
        ordering = ["run", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="unique_event_seq_per_run")]
        indexes = [
            models.Index(fields=["run", "kind", "seq"], name="runevent_run_kind_seq"),
            models.Index(fields=["run", "kind", "stage", "step"], name="runevent_run_kind_stage_step"),
        ]

    def __str__(self):
        return f"{self.run_id}#{self.seq} {self.stage}.{self.kind}"

    @property
    def fields(self) -> dict:
        """The event's own values, without the envelope every event has."""
        return event_fields(self.data)


class GpuLease(models.Model):
    """One GPU of one host held by one running stage, so two runs never share a GPU.

    Leases are rows with a unique (host, index): taking one is an INSERT that
    only one process can win. A lease whose holder process is gone is stale
    and may be taken over (see studio.leases.lease_gpus).
    """

    host = models.CharField(max_length=255)
    index = models.PositiveSmallIntegerField()
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="gpu_leases")
    stage = models.CharField(max_length=64)
    holder_token = models.CharField(max_length=128, help_text="Supervisor identity (boot id:pid:start time).")
    acquired_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["host", "index"]
        constraints = [models.UniqueConstraint(fields=["host", "index"], name="unique_gpu_per_host")]

    def __str__(self):
        return f"{self.host}:gpu{self.index} -> {self.run_id}/{self.stage}"


class Conversation(models.Model):
    """A chat (or a completion document) of one user with one checkpoint, and its sampling settings.

    Messages form a tree: regenerating adds a sibling answer, editing a user
    message adds a sibling question; `leaf` is the message at the end of the
    branch the person is looking at, so a reload shows the same versions.
    """

    class Mode(models.TextChoices):
        CHAT = "chat"  # mid/sft/rl checkpoints: the conversation format
        COMPLETION = "completion"  # base checkpoints: raw text continuation

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, blank=True)
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.CHAT)
    # The checkpoint: a run's stage at a step, or its latest step when step is empty.
    run = models.ForeignKey(Run, null=True, blank=True, on_delete=models.SET_NULL, related_name="conversations")
    stage = models.CharField(max_length=32, blank=True)
    step = models.PositiveIntegerField(null=True, blank=True)
    # Sampling, remembered per conversation (bounds in studio/chat.py).
    temperature = models.FloatField(default=0.6)
    top_k = models.PositiveIntegerField(default=50)
    max_tokens = models.PositiveIntegerField(default=256)
    seed = models.BigIntegerField(null=True, blank=True)
    leaf = models.ForeignKey("Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self):
        return self.title or f"Chat {self.pk}"

    def get_absolute_url(self):
        return reverse("studio:chat", args=[self.pk])

    @property
    def checkpoint_label(self) -> str:
        if not self.stage:
            return ""
        step = f"step {self.step}" if self.step is not None else "latest"
        return f"{self.run_id or 'deleted run'} · {self.stage} · {step}"

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "max_tokens": self.max_tokens, "seed": self.seed}

    def branch(self, leaf: "Message | None" = None) -> list["Message"]:
        """The messages from the root to `leaf` (default: the shown leaf), oldest first."""
        leaf = leaf or self.leaf
        by_id = {m.id: m for m in self.messages.all()}
        path = []
        node = by_id.get(leaf.id) if leaf else None
        while node is not None:
            path.append(node)
            node = by_id.get(node.parent_id)
        return path[::-1]

    def latest_leaf_under(self, message: "Message") -> "Message":
        """Follow the newest child from `message` down: what showing another version of it reveals."""
        children: dict[int | None, list[Message]] = {}
        for m in self.messages.order_by("id"):
            children.setdefault(m.parent_id, []).append(m)
        node = message
        while children.get(node.id):
            node = children[node.id][-1]
        return node


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        DONE = "done"  # finished: a stop token, or max tokens ("length" in finish)
        STREAMING = "streaming"  # being generated by this server right now
        STOPPED = "stopped"  # the person pressed Stop: kept as it is
        INTERRUPTED = "interrupted"  # the page went away mid-answer: continued when it comes back
        ERROR = "error"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children")
    role = models.CharField(max_length=16, choices=Role.choices)
    # User text, or the assistant's answer as text (tool parts included, for search and titles).
    content = models.TextField(blank=True)
    # Assistant answers: [{"type": "text" | "python" | "python_output", "text": ...}], the
    # tokenizer's message parts, so the answer goes back into the next prompt exactly.
    parts = models.JSONField(default=list, blank=True)
    # Generated token ids (forced tool tokens included), so an interrupted answer continues exactly.
    token_ids = models.JSONField(default=list, blank=True)
    # Completion mode: per generated token {"t": text, "p": prob, "top": [[text, prob], ...]}.
    probs = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DONE)
    finish = models.CharField(max_length=16, blank=True, help_text="Why generation ended: stop, length, stopped, error.")
    error = models.TextField(blank=True)
    checkpoint = models.CharField(max_length=300, blank=True, help_text="Which checkpoint wrote it.")
    sampling = models.JSONField(default=dict, blank=True)
    seconds = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self):
        return f"{self.role}: {self.content[:40]}"
