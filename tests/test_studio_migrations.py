"""Data migrations: runs recorded by an older studio keep working after an upgrade."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from pipeline.events import EventWriter


@pytest.mark.django_db(transaction=True)
def test_upgrade_numbers_old_runs_events_and_summarises_them(tmp_path):
    executor = MigrationExecutor(connection)
    executor.migrate([("studio", "0001_initial")])
    old = executor.loader.project_state([("studio", "0001_initial")]).apps
    run_dir = tmp_path / "20260101-000000-abcdef"
    events = EventWriter(run_dir, "base_train")
    events.emit("setup", num_iterations=10)
    for step in (1, 2):
        events.metric(step=step, loss=3.0 - step)
    size = (run_dir / "events.jsonl").stat().st_size
    Run = old.get_model("studio", "Run")
    run = Run.objects.create(id=run_dir.name, preset="tiny", config={}, directory=str(run_dir), events_offset=size)
    RunEvent = old.get_model("studio", "RunEvent")
    for seq, data in enumerate([{"kind": "setup", "num_iterations": 10}, {"kind": "metric", "step": 1, "loss": 2.0},
                                {"kind": "metric", "step": 2, "loss": 1.0}], start=1):
        RunEvent.objects.create(run=run, seq=seq, stage="base_train", kind=data["kind"], data={**data, "stage": "base_train"})

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    from studio import ingest
    from studio.models import Run as NewRun

    run = NewRun.objects.get(pk=run_dir.name)
    assert run.events_seq == 3 and run.summary["progress"]["step"] == 2 and run.summary["metrics"]["loss"]["min"] == 1.0
    assert list(run.events.order_by("seq").values_list("step", flat=True)) == [None, 1, 2]
    events.metric(step=3, loss=0.5)  # the run goes on: the next event is numbered 4, not 1
    assert [e["seq"] for e in ingest.ingest_events(run)] == [4] and run.events.count() == 4
