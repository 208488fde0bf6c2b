"""Runs stored before 0002 have events_seq = 0 and no summary: fill both in.

events_seq must equal the number of lines before events_offset, or the next
ingestion would number events from 1 again and the unique (run, seq) rows
would silently drop them; it is counted from the file itself.
"""

from pathlib import Path

from django.conf import settings
from django.db import migrations


def backfill(apps, schema_editor):
    from studio.ingest import summarize

    Run = apps.get_model("studio", "Run")
    RunEvent = apps.get_model("studio", "RunEvent")
    for run in Run.objects.filter(events_offset__gt=0, events_seq=0):
        run_dir = Path(run.directory) if run.directory else Path(settings.NANOSTUDIO_RUNS_DIR) / run.id
        try:
            with open(run_dir / "events.jsonl", "rb") as f:
                run.events_seq = f.read(run.events_offset).count(b"\n")
        except OSError:  # the directory is gone: the stored rows are all there is
            run.events_offset = 0
        events = [{**e.data, "seq": e.seq} for e in RunEvent.objects.filter(run=run).order_by("seq")]
        for e in RunEvent.objects.filter(run=run, step__isnull=True).exclude(kind="corrupt"):
            step = e.data.get("step")
            if isinstance(step, int) and not isinstance(step, bool):
                e.step = step
                e.save(update_fields=["step"])
        run.summary = summarize({}, events)
        run.save(update_fields=["events_seq", "events_offset", "summary"])


class Migration(migrations.Migration):
    dependencies = [("studio", "0002_pause_resume_leases_summary")]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
