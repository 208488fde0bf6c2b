"""The base_eval stage: CORE, bits per byte and samples on a tiny trained checkpoint; 2 ranks = 1 rank; bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from evals import base_eval
from pipeline import report
from pipeline.events import EventWriter, read_events
from tasks import core
from tests.helpers import REPO, free_port, mirror

# The offline mirror has 18 of the 22 CORE task files.
PRESENT = [t.label for t in core.TASKS if t.label not in ("hellaswag_zeroshot", "hellaswag", "squad", "coqa")]
EVAL = ["--max-per-task", "6", "--device-batch-size", "4", "--eval-tokens", "2048", "--device", "cpu", "--dtype", "float32"]


def env():
    e = {**os.environ, "NANOSTUDIO_DATA_MIRROR": str(mirror()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(key, None)
    return e


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from trainer import tok_train

    os.environ["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    run = tmp_path_factory.mktemp("tokrun")
    assert tok_train.main(["--run-dir", str(run), "--vocab-size", "512", "--max-chars", "400000"]) == 0
    return run / "tokenizer"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A run with a depth-2 model pretrained for 30 steps (CPU, float32)."""
    run = tmp_path_factory.mktemp("trained")
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    cmd = [sys.executable, "-m", "trainer.base_train", "--run-dir", str(run), "--depth", "2", "--aspect-ratio", "32",
           "--head-dim", "64", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
           "--num-iterations", "30", "--device", "cpu", "--dtype", "float32", "--compile", "no", "--eval-every", "0",
           "--eval-tokens", "2048", "--sample-every", "0", "--save-every", "0", "--loader-threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def evaluate(run, *extra, launcher=None, check=True):
    cmd = [*(launcher or [sys.executable]), "-m", "evals.base_eval", "--run-dir", str(run), *EVAL, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def stage_events(run):
    """The events of base_eval's last attempt."""
    events = [e for e in read_events(run)[0] if e["stage"] == "base_eval"]
    last = max(i for i, e in enumerate(events) if e["kind"] == "stage_start")
    return events[last:]


def summary_row(text: str, metric: str) -> list[str]:
    start = text.index("| Metric | BASE |")
    for line in text[start:].splitlines():
        if line.startswith(f"| {metric} |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no summary row {metric}")


@pytest.mark.slow
def test_base_eval_writes_every_event_the_records_and_the_report_cards_base_column(trained):
    run = trained
    proc = evaluate(run)
    assert "CORE (18/22):" in proc.stdout and "squad" in proc.stdout
    events = stage_events(run)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "stage_start" and kinds[-1] == "stage_end" and events[-1]["status"] == "done"
    assert {"setup", "eval", "sample", "result"} <= set(kinds)

    tasks = [e for e in events if e["kind"] == "eval" and e.get("suite") == "core"]
    assert [e["name"] for e in tasks] == PRESENT
    for e in tasks:
        t = core.get(e["name"])
        assert e["count"] == 6 and 0 <= e["accuracy"] <= 1 and e["seconds"] >= 0 and e["step"] == 30
        assert e["centered"] == pytest.approx(core.centered(e["accuracy"], t.baseline), abs=1e-5)
        records = [json.loads(line) for line in (run / "evals" / "base_eval" / f"{t.label}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in records] == list(range(6))
        assert sum(r["correct"] for r in records) == round(e["accuracy"] * 6)
        assert all(r["step"] == 30 and r["index"] not in r["fewshot"] and max(r["tokens"]) <= 64 for r in records)
    assert sorted(p.name for p in (run / "evals" / "base_eval").iterdir()) == sorted(f"{label}.jsonl" for label in PRESENT)

    (core_event,) = [e for e in events if e["kind"] == "eval" and e["name"] == "CORE"]
    mean = sum(e["centered"] for e in tasks) / len(tasks)
    assert core_event["value"] == pytest.approx(mean, abs=1e-5)
    assert core_event["label"] == "CORE (18/22)" and core_event["coverage"] == "18/22"
    assert core_event["missing"] == ["coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    (bpb,) = [e for e in events if e["kind"] == "eval" and e["name"] == "val_bpb"]
    assert 0 < bpb["val_bpb"] < 9  # a trained model: well below log2(512) bits per token / bytes per token
    (result,) = [e for e in events if e["kind"] == "result"]
    assert result["core_label"] == "CORE (18/22)" and result["core_tasks"] == 18 and result["core_examples"] == 18 * 6
    assert result["val_bpb"] == bpb["val_bpb"] and result["core"] == pytest.approx(mean, abs=1e-5)
    (sample,) = [e for e in events if e["kind"] == "sample"]
    assert len(sample["samples"]) == 6 and all(s["completion"] for s in sample["samples"])

    text = report.build_report(run)
    assert summary_row(text, "CORE")[1] == f"{core_event['value']:.4f} (18/22)"
    assert summary_row(text, "ARC-Easy")[1] == "—"  # CORE's arc_easy is a few-shot completion task, not the chat eval
    assert "Base model evaluation (`base_eval`)" in text and "| arc_easy | " in text  # listed in its section

    # One task, no bpb: CORE over one task is labelled so.
    evaluate(run, "--tasks", "copa,samples", "--max-per-task", "10")
    events = stage_events(run)
    assert [e["name"] for e in events if e["kind"] == "eval"] == ["copa", "CORE"]
    assert next(e for e in events if e["kind"] == "result")["core_label"] == "CORE (1/22)"
    assert len((run / "evals" / "base_eval" / "copa.jsonl").read_text().splitlines()) == 10


@pytest.mark.slow
def test_two_ranks_score_every_example_once_like_one_rank(trained, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        shutil.copytree(trained / "tokenizer", run / "tokenizer")
        shutil.copytree(trained / "checkpoints", run / "checkpoints")
    extra = ("--tasks", "core", "--max-per-task", "7")  # odd: the ranks get 4 and 3 examples
    evaluate(one, *extra)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "--master_addr=127.0.0.1"]
    evaluate(two, *extra, launcher=launcher)

    def per_task(run):
        return {e["name"]: (e.get("count"), e.get("accuracy", e.get("value"))) for e in stage_events(run) if e["kind"] == "eval"}

    assert per_task(two) == per_task(one) and len(per_task(one)) == 19  # 18 tasks + CORE
    assert {count for name, (count, _) in per_task(one).items() if name != "CORE"} == {7}
    for label in PRESENT:
        a = [json.loads(x) for x in (one / "evals" / "base_eval" / f"{label}.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (two / "evals" / "base_eval" / f"{label}.jsonl").read_text().splitlines()]
        assert [(r["index"], r["correct"], r["fewshot"]) for r in a] == [(r["index"], r["correct"], r["fewshot"]) for r in b]
    assert stage_events(two)[0]["world_size"] == 2


# --- bad input (in-process, no model to train) -------------------------------------------------

def test_an_unknown_task_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        base_eval.parse_args(["--run-dir", "runs/x", "--tasks", "core,arc_eazy"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--tasks: unknown task(s) arc_eazy; use core, bpb, samples or CORE task labels" in err and "arc_easy" in err
    assert base_eval.parse_tasks("bpb") == (["bpb"], [])
    assert base_eval.parse_tasks("winograd,samples") == (["samples", "core"], ["winograd"])
    assert base_eval.parse_tasks("core")[1] == [t.label for t in core.TASKS]


def _error(run) -> str:
    (error,) = [e for e in read_events(run)[0] if e["stage"] == "base_eval" and e["kind"] == "error"]
    return error["message"]


def test_no_tokenizer_or_no_checkpoint_fail_with_the_fix(tmp_path, tokenizer_dir, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert base_eval.main(["--run-dir", str(bare), "--device", "cpu"]) == 1
    assert "tokenizer.json not found; run the tok_train stage first" in _error(bare)

    untrained = tmp_path / "untrained"
    shutil.copytree(tokenizer_dir, untrained / "tokenizer")
    assert base_eval.main(["--run-dir", str(untrained), "--device", "cpu"]) == 1
    assert "no checkpoint for stage base_train" in _error(untrained) and "train a model first" in _error(untrained)
    assert "base_eval failed: no checkpoint for stage base_train" in capsys.readouterr().err


def test_a_records_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = base_eval.write_records(tmp_path, "copa", [{"index": 0, "correct": True}])
    assert path == tmp_path / "evals" / "base_eval" / "copa.jsonl"
    before = path.read_text()

    def broken(obj, **kw):
        if obj["index"] == 1:
            raise RuntimeError("killed mid-write")
        return json.JSONEncoder().encode(obj)

    monkeypatch.setattr(base_eval.json, "dumps", broken)
    with pytest.raises(RuntimeError):
        base_eval.write_records(tmp_path, "copa", [{"index": 0}, {"index": 1}])
    assert path.read_text() == before  # the complete file from before, never a half one under its name
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".jsonl")] == ["copa.jsonl"]


def test_core_task_events_stay_out_of_the_summary_and_a_partial_core_says_so(tmp_path):
    events = EventWriter(tmp_path, "base_eval")
    events.start()
    events.emit("eval", name="arc_easy", suite="core", accuracy=0.5, centered=0.333)
    events.emit("eval", name="CORE", value=0.1234, coverage="18/22")
    events.end(status="done")
    text = report.build_report(tmp_path)
    assert summary_row(text, "CORE")[1] == "0.1234 (18/22)"
    assert summary_row(text, "ARC-Easy")[1] == "—"
