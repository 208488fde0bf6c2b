"""Pause, resume, kill, delete, GPU leases and the run summary (studio.actions, real subprocesses)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from studio import actions, ingest, leases, processes
from studio.models import GpuLease, Run, StageRun
from pipeline import config
from tests.test_studio_actions import process_gone, wait_until

pytestmark = pytest.mark.django_db

TOK_AND_BASE = {"stages": "tok_train,base_train"}


def stop_on_first_metric(run, action, stage="base_train"):
    """on_event callback that applies `action` once the stage has written a few steps."""
    done = []

    def on_event(event):
        if not done and event.get("kind") == "metric" and event.get("stage") == stage and event.get("step", 0) >= 3:
            done.append(run.stages.get(name=stage).pid)
            action(Run.objects.get(pk=run.pk))

    return on_event, done


def test_pause_saves_a_checkpoint_and_resume_continues_from_it(runs_dir, fake_stages):
    fake_stages["base_train"] = "pausable"
    run = actions.create_run("tiny", TOK_AND_BASE)
    on_event, paused = stop_on_first_metric(run, actions.pause_run)
    run = actions.execute_run(run, on_event=on_event)

    assert run.status == Run.Status.PAUSED and run.error == "" and not run.pause_requested
    base = run.stages.get(name="base_train")
    assert base.status == StageRun.Status.PAUSED and base.exit_code == 75
    assert run.events.filter(kind="checkpoint", stage="base_train").exists()
    assert process_gone(paused[0])

    run = actions.resume_run(run, enqueue=False)
    assert run.status == Run.Status.QUEUED
    assert list(run.stages.values_list("status", flat=True)) == ["done", "queued"]
    run = actions.execute_run(run)
    assert run.status == Run.Status.DONE
    base = run.stages.get(name="base_train")
    assert base.argv[-1] == "--resume"  # it restarted from the checkpoint, not from scratch
    assert run.stages.get(name="tok_train").started_at < base.started_at
    resumed = run.events.get(kind="resume")
    assert resumed.data["checkpoint"].startswith("step_")
    # tok_train ran once: a resume does not repeat finished stages.
    assert run.events.filter(kind="stage_start", stage="tok_train").count() == 1


def test_pause_between_stages_leaves_the_rest_queued(runs_dir, fake_stages):
    run = actions.create_run("tiny", TOK_AND_BASE)

    def on_stage(stage):
        if stage.name == "tok_train" and stage.status == StageRun.Status.RUNNING:
            actions.pause_run(Run.objects.get(pk=run.pk))

    run = actions.execute_run(run, on_stage=on_stage)
    assert run.status == Run.Status.PAUSED
    # base_train never started: resume starts it.
    assert run.stages.get(name="base_train").status == StageRun.Status.QUEUED
    assert run.stages.get(name="base_train").started_at is None


def test_kill_sends_sigkill_at_once_even_to_a_stage_that_ignores_sigterm(runs_dir, fake_stages, settings):
    fake_stages["base_train"] = "stubborn"
    settings.NANOSTUDIO_CANCEL_GRACE = 60  # a cancel would wait a minute; a kill must not
    run = actions.create_run("tiny", TOK_AND_BASE)
    grandchild = []

    def on_event(event):
        path = run.run_dir / "base_train.grandchild"
        if not grandchild and event.get("stage") == "base_train" and event.get("kind") == "metric" and path.exists():
            grandchild.append(int(path.read_text()))
            actions.kill_run(Run.objects.get(pk=run.pk))

    run = actions.execute_run(run, on_event=on_event)
    assert run.status == Run.Status.CANCELLED and run.error == "killed during base_train"
    base = run.stages.get(name="base_train")
    assert base.status == StageRun.Status.CANCELLED and base.exit_code == -signal.SIGKILL
    assert base.duration < 30
    assert wait_until(lambda: process_gone(grandchild[0]))


def test_pause_is_refused_unless_running(runs_dir):
    run = actions.create_run("tiny", TOK_AND_BASE)
    with pytest.raises(actions.ActionError, match="only a running run can be paused"):
        actions.pause_run(run)


def test_resume_is_refused_for_a_finished_or_active_run(runs_dir, fake_stages):
    run = actions.create_run("tiny", TOK_AND_BASE)
    with pytest.raises(actions.ActionError, match="queued"):
        actions.resume_run(run, enqueue=False)
    run = actions.execute_run(run)
    with pytest.raises(actions.ActionError, match="only a paused, failed or cancelled run"):
        actions.resume_run(run, enqueue=False)


def test_a_failed_run_resumes_from_the_failed_stage(runs_dir, fake_stages):
    fake_stages["base_train"] = "fail"
    run = actions.execute_run(actions.create_run("tiny", TOK_AND_BASE))
    assert run.status == Run.Status.FAILED
    fake_stages["base_train"] = "ok"  # the cause was fixed
    run = actions.execute_run(actions.resume_run(run, enqueue=False))
    assert run.status == Run.Status.DONE and run.error == ""
    assert run.events.filter(kind="stage_start", stage="tok_train").count() == 1
    assert run.events.filter(kind="stage_start", stage="base_train").count() == 2


def test_resume_queues_the_run_on_the_worker(runs_dir, fake_stages):
    from django_q.models import OrmQ

    fake_stages["base_train"] = "fail"
    run = actions.execute_run(actions.create_run("tiny", TOK_AND_BASE))
    actions.resume_run(run)
    assert OrmQ.objects.count() == 1


def test_an_interrupted_run_can_be_resumed(runs_dir):
    run = actions.create_run("tiny", TOK_AND_BASE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, supervisor_pid=dead.pid,
                                         supervisor_host=socket.gethostname(),
                                         supervisor_token=processes.process_token(dead.pid) or f"x:{dead.pid}:0")
    run.stages.filter(name="tok_train").update(status=StageRun.Status.RUNNING)
    assert [r.pk for r in actions.reap_orphaned_runs()] == [run.pk]
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "resume it" in run.error and run.is_resumable


def test_process_tokens_tell_a_reused_pid_from_the_original(runs_dir):
    me = processes.process_token()
    assert processes.token_alive(me)
    boot, pid, start = me.rsplit(":", 2)
    assert not processes.token_alive(f"{boot}:{pid}:{int(start) + 1}")  # same pid, another process
    assert not processes.token_alive(f"another-boot:{pid}:{start}")  # the machine restarted
    assert not processes.token_alive("garbage")


def test_delete_removes_rows_and_the_run_directory(runs_dir, fake_stages):
    run = actions.execute_run(actions.create_run("tiny", TOK_AND_BASE))
    directory = run.run_dir
    assert directory.is_dir()
    actions.delete_run(run)
    assert not Run.objects.filter(pk=run.pk).exists() and not directory.exists()


def test_delete_refuses_an_active_run(runs_dir):
    run = actions.create_run("tiny", TOK_AND_BASE)
    with pytest.raises(actions.ActionError, match="stop it before deleting"):
        actions.delete_run(run)
    assert run.run_dir.is_dir() and Run.objects.filter(pk=run.pk).exists()


def test_delete_never_removes_a_folder_that_is_not_the_runs_own(runs_dir, fake_stages, tmp_path):
    run = actions.execute_run(actions.create_run("tiny", TOK_AND_BASE))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    Run.objects.filter(pk=run.pk).update(directory=str(precious))
    actions.delete_run(Run.objects.get(pk=run.pk))
    assert (precious / "keep.txt").exists()


# --- GPU leases ------------------------------------------------------------------------------


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setenv("NANOSTUDIO_GPUS", "4")
    leases.host_gpu_count.cache_clear()
    yield 4
    leases.host_gpu_count.cache_clear()


def test_runs_never_share_a_gpu_and_wait_for_free_ones(runs_dir, four_gpus):
    a = actions.create_run("tiny", {**TOK_AND_BASE, "nproc_per_node": "3", "total_batch_size": str(3 * 8 * 256)})
    b = actions.create_run("tiny", {**TOK_AND_BASE, "nproc_per_node": "2", "total_batch_size": str(2 * 8 * 256)})
    stage_a, stage_b = a.stages.get(name="base_train"), b.stages.get(name="base_train")
    assert leases.lease_gpus(a, stage_a, 3) == [0, 1, 2]

    polls = []

    def give_up_after_two_polls():
        polls.append(1)
        return len(polls) > 2

    assert leases.lease_gpus(b, stage_b, 2, stop_check=give_up_after_two_polls) is None
    stage_b.refresh_from_db()
    assert "waiting for 2 GPU(s): 3 of 4 in use by " + a.id in stage_b.note

    leases.release_gpus(a, stage_a)
    assert leases.lease_gpus(b, stage_b, 2) == [0, 1]
    stage_b.refresh_from_db()
    assert stage_b.note == ""


def test_a_stale_lease_of_a_dead_supervisor_is_taken_over(runs_dir, four_gpus):
    a = actions.create_run("tiny", TOK_AND_BASE)
    b = actions.create_run("tiny", {**TOK_AND_BASE, "nproc_per_node": "4", "total_batch_size": str(4 * 8 * 256)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    GpuLease.objects.create(host=socket.gethostname(), index=2, run=a, stage="base_train",
                            holder_token=f"{processes.process_token().split(':')[0]}:{dead.pid}:1")
    assert leases.lease_gpus(b, b.stages.get(name="base_train"), 4) == [0, 1, 2, 3]


def test_gpu_stages_run_with_their_leased_devices(runs_dir, fake_stages, four_gpus):
    run = actions.execute_run(actions.create_run("tiny", {**TOK_AND_BASE, "nproc_per_node": "2",
                                                          "total_batch_size": str(2 * 8 * 256)}))
    assert run.status == Run.Status.DONE
    assert run.stages.get(name="base_train").gpus == "0,1"
    assert run.stages.get(name="tok_train").gpus == ""  # CPU-only stages take no GPU
    assert not GpuLease.objects.exists()  # released at the end of the stage


def test_asking_for_more_gpus_than_the_node_has_is_a_field_error(runs_dir, four_gpus):
    from pipeline import config

    with pytest.raises(config.ConfigError) as e:
        actions.create_run("tiny", {"nproc_per_node": "8", "total_batch_size": str(8 * 8 * 256)})
    assert "this node has 4 GPU(s)" in e.value.errors["nproc_per_node"]


# --- summary ---------------------------------------------------------------------------------


def test_summary_tracks_progress_and_min_last_of_key_metrics():
    events = [
        {"stage": "base_train", "kind": "setup", "num_iterations": 100},
        {"stage": "base_train", "kind": "metric", "step": 1, "loss": 5.0, "tok_per_sec": 10.0},
        {"stage": "base_train", "kind": "eval", "name": "val_bpb", "step": 1, "val_bpb": 2.0},
        {"stage": "base_train", "kind": "metric", "step": 2, "loss": 4.0, "tok_per_sec": 12.0},
        {"stage": "base_train", "kind": "metric", "step": 3, "loss": 4.5, "tok_per_sec": "NaN"},
        {"stage": "base_train", "kind": "eval", "name": "val_bpb", "step": 3, "val_bpb": 2.5},
    ]
    s = ingest.summarize({}, events[:3])
    s = ingest.summarize(s, events[3:])  # folding in pieces equals folding at once
    assert s == ingest.summarize({}, events)
    assert s["progress"] == {"stage": "base_train", "step": 3, "total": 100, "fraction": 0.03}
    assert s["metrics"]["loss"]["last"] == 4.5 and s["metrics"]["loss"]["min"] == 4.0
    assert s["metrics"]["val_bpb"]["min"] == 2.0 and s["metrics"]["val_bpb"]["last"] == 2.5
    assert s["metrics"]["tok_per_sec"]["last"] == 12.0  # a non-number is skipped


def test_ingest_keeps_the_summary_and_sequence_numbers_in_step(runs_dir, fake_stages):
    run = actions.execute_run(actions.create_run("tiny", TOK_AND_BASE))
    assert run.events_seq == run.events.count()
    assert run.summary["metrics"]["loss"]["min"] == 1.0
    assert run.summary["progress"]["stage"] == "base_train"


@pytest.mark.slow
def test_pausing_real_pretraining_and_resuming_continues_at_the_next_step(runs_dir, monkeypatch):
    """The real stages (smoke preset): Pause mid-pretraining, then Resume from the saved checkpoint."""
    from tests.helpers import mirror

    monkeypatch.setenv("NANOSTUDIO_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = actions.create_run("smoke", {"stages": "tok_train,base_train", "save_every": "1000", "eval_every": "0",
                                       "sample_every": "0"})
    on_event, paused = stop_on_first_metric(run, actions.pause_run)
    run = actions.execute_run(run, on_event=on_event)
    assert run.status == Run.Status.PAUSED, run.error
    saved = run.events.filter(kind="checkpoint", stage="base_train").get()
    paused_at = saved.data["step"]
    assert 3 <= paused_at < 60  # saved where it stopped, not at a periodic checkpoint

    run = actions.execute_run(actions.resume_run(run, enqueue=False))
    assert run.status == Run.Status.DONE, run.error
    assert run.events.get(kind="resume").data["step"] == paused_at
    steps = list(run.events.filter(kind="metric", stage="base_train").order_by("seq").values_list("step", flat=True))
    assert steps == list(range(1, 61))  # one continuous curve: no step repeated, none missing
    assert run.events.filter(kind="result", stage="base_train").order_by("-seq").first().data["step"] == 60
    assert (run.run_dir / "report.md").is_file() and "| Metric | BASE | MID | SFT | RL |" in (run.run_dir / "report.md").read_text()


def test_a_starting_queue_worker_marks_interrupted_runs(runs_dir):
    from django_q.signals import post_spawn

    run = actions.create_run("tiny", TOK_AND_BASE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, supervisor_pid=dead.pid,
                                         supervisor_host=socket.gethostname())
    post_spawn.send(sender="django_q", proc_name="Process-1")  # what qcluster sends as each worker starts
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "interrupted" in run.error


# --- resume on another number of GPUs ---------------------------------------------------------


def test_resume_on_another_gpu_count_rewrites_the_config_and_the_stage_command(runs_dir, fake_stages):
    fake_stages["base_train"] = "pausable"
    run = actions.create_run("tiny", {**TOK_AND_BASE, "nproc_per_node": "2", "total_batch_size": str(2 * 2048)})
    on_event, _ = stop_on_first_metric(run, actions.pause_run)
    run = actions.execute_run(run, on_event=on_event)
    assert run.status == Run.Status.PAUSED

    run = actions.resume_run(run, enqueue=False, gpus="1")
    assert run.status == Run.Status.QUEUED and run.config["nproc_per_node"] == 1
    assert json.loads((run.run_dir / "config.json").read_text())["nproc_per_node"] == 1
    base = next(c for c in config.stage_commands(run.config, str(run.run_dir)) if c.name == "base_train")
    assert "torchrun" not in " ".join(base.argv)  # one process needs no launcher
    assert "resumed on 1 GPU(s) per node" in (run.run_dir / "logs" / "studio.log").read_text()


@pytest.mark.parametrize("gpus", ["0", "two", "1e400", "65", "3"])
def test_resume_on_a_bad_gpu_count_is_refused_and_changes_nothing(runs_dir, fake_stages, gpus):
    fake_stages["base_train"] = "pausable"
    run = actions.create_run("tiny", {**TOK_AND_BASE, "total_batch_size": str(4 * 2048)})
    on_event, _ = stop_on_first_metric(run, actions.pause_run)
    run = actions.execute_run(run, on_event=on_event)
    with pytest.raises(config.ConfigError) as err:
        actions.resume_run(run, enqueue=False, gpus=gpus)
    assert "This run can resume on 1, 2, 4 GPU(s)" in err.value.errors["nproc_per_node"]
    run.refresh_from_db()
    assert run.status == Run.Status.PAUSED and run.config["nproc_per_node"] == 1
    assert json.loads((run.run_dir / "config.json").read_text())["nproc_per_node"] == 1


def test_the_resume_button_takes_a_gpu_count(client, runs_dir, fake_stages):
    fake_stages["base_train"] = "pausable"
    run = actions.create_run("tiny", {**TOK_AND_BASE, "total_batch_size": str(4 * 2048)})
    on_event, _ = stop_on_first_metric(run, actions.pause_run)
    run = actions.execute_run(run, on_event=on_event)
    page = client.get(run.get_absolute_url()).content.decode()
    assert 'name="gpus"' in page
    answer = client.post(f"/runs/{run.id}/resume/", {"gpus": "3"}, HTTP_ACCEPT="application/json")
    assert answer.status_code == 409 and "can resume on 1, 2, 4 GPU(s)" in answer.json()["message"]
    assert Run.objects.get(pk=run.pk).status == Run.Status.PAUSED
    answer = client.post(f"/runs/{run.id}/resume/", {"gpus": "4"}, HTTP_ACCEPT="application/json")
    assert answer.status_code == 200 and "4 GPU(s)" in answer.json()["message"], answer.json()
    assert Run.objects.get(pk=run.pk).config["nproc_per_node"] == 4


@pytest.mark.slow
def test_real_pretraining_paused_on_two_ranks_resumes_on_one(runs_dir, monkeypatch):
    """Pause a 2-rank (torchrun, gloo) pretraining from the studio, resume it on 1 rank with 2x accumulation."""
    from tests.helpers import mirror

    monkeypatch.setenv("NANOSTUDIO_DATA_MIRROR", str(mirror()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = actions.create_run("smoke", {"stages": "tok_train,base_train", "save_every": "1000", "eval_every": "0",
                                       "sample_every": "0", "num_iterations": "12", "total_batch_size": str(2 * 4 * 128),
                                       "nproc_per_node": "2"})
    on_event, _ = stop_on_first_metric(run, actions.pause_run)
    run = actions.execute_run(run, on_event=on_event)
    assert run.status == Run.Status.PAUSED, run.error
    paused_at = run.events.get(kind="checkpoint", stage="base_train").data["step"]

    run = actions.execute_run(actions.resume_run(run, enqueue=False, gpus=1))
    assert run.status == Run.Status.DONE, run.error
    resumed = run.events.get(kind="resume").data
    assert resumed["step"] == paused_at
    assert (resumed["saved_world_size"], resumed["world_size"], resumed["grad_accum"]) == (2, 1, 2)
    steps = list(run.events.filter(kind="metric", stage="base_train").order_by("seq").values_list("step", flat=True))
    assert steps == list(range(1, 13))  # one continuous curve across the move
