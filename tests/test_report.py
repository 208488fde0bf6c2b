"""pipeline.report: the report card built from a run directory written by the real EventWriter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import markdown
import pytest

from pipeline import hardware, report
from pipeline.events import EventWriter, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.delenv(hardware.PRICE_ENV, raising=False)
    path = tmp_path / "20260101-000000-abc123"
    path.mkdir()
    write_json_atomic(path / "config.json", {"preset": "tiny", "description": "test run", "stages": ["tok_train"]})
    return path


def stage(run_dir, name, events=(), start=T0, end=None, status="done", args=None):
    """Write one stage's events as the stages do: stage_start, its events, stage_end.

    `events` are (seconds after start, kind, fields); `end` is seconds after start, or None for a stage that
    never finished. EventWriter lets `time` be given, so the timings are exact.
    """
    writer = EventWriter(run_dir, name)
    writer.start(time=start, args=args or {"run_dir": str(run_dir)})
    for offset, kind, fields in events:
        writer.emit(kind, time=start + offset, **fields)
    if end is not None:
        writer.end(time=start + end, status=status)


def environment(run_dir, gpus):
    write_json_atomic(run_dir / "environment.json", {
        "hostname": "node", "platform": "Linux", "cpu": {"model": "cpu", "cores": 2}, "memory_gb": 8.0,
        "gpus": gpus, "python": "3.11", "packages": {}, "git": None,
        "code": {"characters": 100, "lines": 10, "files": 2, "dependencies": 3},
    })


def summary_row(text: str, metric: str) -> list[str]:
    start = text.index("| Metric | BASE | MID | SFT | RL |")
    for line in text[start:].splitlines():
        if line.startswith(f"| {metric} |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no summary row {metric}")


# --- summary table -------------------------------------------------------------------------------

def test_summary_header_has_the_fixed_form(run):
    stage(run, "base_eval", [(1, "eval", {"name": "CORE", "value": 0.2})], end=2)
    assert "| Metric | BASE | MID | SFT | RL |" in report.build_report(run)


def test_eval_values_land_in_their_stage_column(run):
    stage(run, "base_eval", [(1, "eval", {"name": "CORE", "value": 0.2219})], end=2)
    stage(run, "sft_eval", [(1, "eval", {"name": "GSM8K", "value": 0.0455})], start=T0 + 10, end=2)
    stage(run, "rl_eval", [(1, "eval", {"name": "GSM8K", "value": 0.0758})], start=T0 + 20, end=2)
    stage(run, "mid_eval", [(1, "eval", {"name": "MMLU", "value": 0.31})], start=T0 + 30, end=2)
    text = report.build_report(run)
    assert summary_row(text, "CORE") == ["CORE", "0.2219", "—", "—", "—"]
    assert summary_row(text, "GSM8K") == ["GSM8K", "—", "—", "0.0455", "0.0758"]
    assert summary_row(text, "MMLU") == ["MMLU", "—", "0.3100", "—", "—"]


def test_metric_names_match_ignoring_case_dashes_underscores_and_spaces(run):
    stage(run, "sft_eval", [(1, "eval", {"name": "arc_easy", "value": 0.5}),
                            (2, "eval", {"name": "ARC-Challenge", "value": 0.4}),
                            (3, "eval", {"name": "human eval", "value": 0.1}),
                            (4, "eval", {"name": "chat_core", "value": 0.09})], end=5)
    text = report.build_report(run)
    assert summary_row(text, "ARC-Easy")[3] == "0.5000"
    assert summary_row(text, "ARC-Challenge")[3] == "0.4000"
    assert summary_row(text, "HumanEval")[3] == "0.1000"
    assert summary_row(text, "ChatCORE")[3] == "0.0900"


def test_eval_number_falls_back_from_value_to_named_field_to_score_to_accuracy(run):
    stage(run, "base_eval", [(1, "eval", {"name": "CORE", "value": 0.1, "score": 0.9}),
                             (2, "eval", {"name": "mmlu", "mmlu": 0.2, "score": 0.9}),
                             (3, "eval", {"name": "GSM8K", "score": 0.3, "accuracy": 0.9}),
                             (4, "eval", {"name": "HumanEval", "accuracy": 0.4})], end=5)
    text = report.build_report(run)
    assert [summary_row(text, m)[1] for m in ("CORE", "MMLU", "GSM8K", "HumanEval")] == \
        ["0.1000", "0.2000", "0.3000", "0.4000"]


def test_missing_metrics_show_a_dash(run):
    stage(run, "tok_train", end=1)
    text = report.build_report(run)
    for metric in ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"):
        assert summary_row(text, metric) == [metric, "—", "—", "—", "—"]


def test_evals_of_training_stages_do_not_fill_the_summary(run):
    stage(run, "base_train", [(1, "eval", {"name": "CORE", "value": 0.5})], end=2)
    assert summary_row(report.build_report(run), "CORE") == ["CORE", "—", "—", "—", "—"]


# --- stage sections ------------------------------------------------------------------------------

def test_tok_eval_compression_is_a_table(run):
    result = {"name": "tokenizer", "encoders": ["ours", "gpt2"], "vocab_size": 4096, "notes": ["gpt4 missing"],
              "rows": [{"domain": "news", "bytes": 12345, "ours_bytes_per_token": 4.5, "gpt2_bytes_per_token": 4.2,
                        "vs_gpt2_pct": 6.67}]}
    stage(run, "tok_eval", [(1, "eval", result)], end=2)
    text = report.build_report(run)
    assert "| Domain | Bytes | ours bytes/token | gpt2 bytes/token | vs gpt2 |" in text
    assert "| news | 12,345 | 4.50 | 4.20 | +6.7% |" in text
    assert "- gpt4 missing" in text


def test_val_bpb_shows_first_min_and_last(run):
    evals = [(i, "eval", {"name": "val_bpb", "step": step, "val_bpb": bpb})
             for i, (step, bpb) in enumerate([(0, 3.2), (100, 1.1), (200, 1.25)], start=1)]
    stage(run, "base_train", evals, end=5)
    text = report.build_report(run)
    assert "| first | 3.2000 | 0 |" in text
    assert "| min | 1.1000 | 100 |" in text
    assert "| last | 1.2500 | 200 |" in text


def test_base_train_setup_is_listed_with_the_parameters(run):
    setup = {"params": 561_000_000, "flops_per_token": 3_400_000_000, "num_iterations": 21400, "world_size": 8,
             "device": "cuda", "dtype": "bfloat16", "model_config": {"n_layer": 20}}
    stage(run, "base_train", [(1, "setup", setup)], end=2, args={"depth": 20})
    text = report.build_report(run)
    for row in ("| depth | 20 |", "| params | 561,000,000 |", "| num_iterations | 21,400 |", "| world_size | 8 |",
                "| dtype | bfloat16 |", "| model.n_layer | 20 |"):
        assert row in text


def test_last_sample_event_becomes_a_table(run):
    stage(run, "base_train", [(1, "sample", {"step": 10, "samples": [{"prompt": "The", "completion": "old"}]}),
                              (2, "sample", {"step": 20, "samples": [{"prompt": "The", "completion": "new"}]})], end=3)
    text = report.build_report(run)
    assert "| ` The ` | ` new ` |" in text
    assert "old" not in text


def test_stage_duration_runs_from_start_to_end(run):
    stage(run, "tok_train", end=125)
    assert "- **Duration:** 2 m 05 s" in report.build_report(run)


def test_stage_without_end_did_not_finish_and_lasts_to_its_last_event(run):
    stage(run, "base_train", [(30, "metric", {"step": 1})])
    text = report.build_report(run)
    assert "- **Status:** did not finish" in text
    assert "- **Duration:** 30.0 s" in text


def test_stage_end_status_is_reported(run):
    stage(run, "base_train", end=1, status="failed")
    assert "- **Status:** failed" in report.build_report(run)


def test_stages_appear_in_order_of_first_event(run):
    stage(run, "tok_train", end=1)
    stage(run, "tok_eval", start=T0 + 5, end=1)
    text = report.build_report(run)
    assert text.index("(`tok_train`)") < text.index("(`tok_eval`)") < text.index("## Summary")


def test_corrupt_lines_are_ignored(run):
    stage(run, "tok_train", end=1)
    with open(run / "events.jsonl", "a") as f:
        f.write('{"time": 1, "stage": "tok_tr\n')
    stage(run, "tok_eval", start=T0 + 5, end=1)
    text = report.build_report(run)
    assert re.findall(r"^## .*$", text, re.M) == [
        "## Environment", "## Code size", "## Tokenizer training (`tok_train`)",
        "## Tokenizer evaluation (`tok_eval`)", "## Summary"]
    assert "**Total wall-clock time:** 6.0 s" in text


def test_run_without_events_gives_a_short_report(run):
    text = report.build_report(run)
    assert "No events recorded yet" in text
    assert "## Summary" not in text


def test_environment_not_recorded_is_said(run):
    stage(run, "tok_train", end=1)
    assert "Environment not recorded." in report.build_report(run)


# --- time and cost -------------------------------------------------------------------------------

def test_total_wall_clock_runs_from_first_to_last_event(run):
    stage(run, "tok_train", end=60)
    stage(run, "base_train", start=T0 + 3600, end=3600)
    assert "**Total wall-clock time:** 2 h 00 m" in report.build_report(run)


def test_cost_of_eight_h100_for_two_hours(run):
    environment(run, [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}] * 8)
    stage(run, "base_train", end=7200)
    text = report.build_report(run)
    assert "48.00 USD" in text
    assert "16.00 GPU-hours" in text


def test_identical_gpus_are_listed_once_with_a_count(run):
    environment(run, [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}] * 8)
    stage(run, "tok_train", end=1)
    assert "| GPUs | 8 × NVIDIA H100 80GB HBM3 (81559 MiB) |" in report.build_report(run)


def test_a100_is_not_priced_as_a10():
    assert hardware.gpu_hour_price("NVIDIA A100-SXM4-80GB") == 1.80
    assert hardware.gpu_hour_price("NVIDIA A10") == 0.75
    assert hardware.gpu_hour_price("Some Future GPU") == hardware.DEFAULT_GPU_HOUR_PRICE


def test_price_per_gpu_hour_can_be_overridden(run, monkeypatch):
    monkeypatch.setenv(hardware.PRICE_ENV, "1.25")
    environment(run, [{"name": "NVIDIA H100", "memory_mib": 81559}] * 2)
    stage(run, "base_train", end=3600)
    assert "2.50 USD" in report.build_report(run)


def test_cpu_only_run_has_no_gpu_cost(run):
    environment(run, [])
    stage(run, "tok_train", end=10)
    assert "CPU only, no GPU cost" in report.build_report(run)


# --- untrusted values ----------------------------------------------------------------------------

HOSTILE = "a|b `c` <script>alert(1)</script> \\| x | y |\n| z | [l](javascript:alert(1)) \\"


class Tables(HTMLParser):
    """The text of every cell of every table in rendered HTML, and the set of tags seen."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.tags: set[str] = set()
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            self.tables[-1][-1][-1] += data


def separators_per_table(text: str) -> list[set[int]]:
    """For each Markdown table, the set of counts of unescaped '|' on its lines (one count if intact)."""
    counts, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = set()
                counts.append(current)
            current.add(len(re.findall(r"(?<!\\)(?:\\\\)*\|", line)))
        else:
            current = None
    return counts


def test_hostile_event_values_cannot_break_tables(run):
    (run / "config.json").write_text(json.dumps({"preset": HOSTILE, "description": HOSTILE}))
    stage(run, "base_train", [(1, "setup", {"params": HOSTILE, HOSTILE: 1}),
                              (2, "sample", {"step": 1, "samples": [{"prompt": HOSTILE, "completion": HOSTILE}]}),
                              (3, "result", {"note": HOSTILE}),
                              (4, "error", {"message": HOSTILE})], end=5, status=HOSTILE, args={"evil": HOSTILE})
    stage(run, HOSTILE, [(1, "eval", {"name": HOSTILE, "value": 1.0})], end=2)
    stage(run, "base_eval", [(1, "eval", {"name": "CORE", "value": 0.25}),
                             (2, "eval", {"name": HOSTILE, "score": 0.5})], end=3)
    environment(run, [{"name": HOSTILE, "memory_mib": HOSTILE}])
    text = report.build_report(run)

    # Every line of a table has the same number of cell separators (what GitHub-style renderers count) ...
    assert all(len(counts) == 1 for counts in separators_per_table(text))
    # ... and, rendered by plain Markdown with raw HTML *allowed*, each value stays whole in its own cell.
    parser = Tables()
    parser.feed(markdown.markdown(text, extensions=["tables"]))
    rows = [[cell.strip() for cell in row] for table in parser.tables for row in table]
    shown = " ".join(HOSTILE.split())
    assert ["evil", shown] in rows
    assert ["note", shown] in rows
    assert [shown, "1"] in rows
    assert [shown, "0.5000", "—"] in rows
    coded = HOSTILE.replace("\n", "⏎").replace("`", "ˋ").replace("|", "¦")
    assert [coded, coded] in rows
    assert "script" not in parser.tags and "a" not in parser.tags
    assert summary_row(text, "CORE") == ["CORE", "0.2500", "—", "—", "—"]


def test_hostile_sample_text_is_kept_readable_in_a_code_span(run):
    stage(run, "base_train", [(1, "sample", {"step": 1, "samples": [{"prompt": "p", "completion": "<b>|`x`"}]})], end=2)
    html = markdown.markdown(report.build_report(run), extensions=["tables"])
    assert "<code>&lt;b&gt;¦ˋxˋ</code>" in html


# --- environment, code size, CLI -----------------------------------------------------------------

def test_capture_environment_records_git_commit_and_code_size(tmp_path):
    env = report.capture_environment(tmp_path)
    saved = json.loads((tmp_path / "environment.json").read_text())
    assert saved == env
    assert re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"])
    assert env["code"]["characters"] > 0 and env["code"]["lines"] > 0 and env["code"]["files"] > 0
    assert env["code"]["dependencies"] > 0
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))


def test_code_files_leave_out_tests_data_runs_and_locks():
    files = [p.relative_to(REPO).as_posix() for p in report.code_files(REPO)]
    assert "pipeline/events.py" in files
    assert not any(f.startswith(("runs/", "tests/data/")) or f.endswith(".lock") for f in files)
    assert all(Path(f).suffix in report.CODE_EXTENSIONS for f in files)


def test_code_tokens_use_the_run_tokenizer(run):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x):\n    return x\n"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    (run / "tokenizer").mkdir()
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    environment(run, [])
    stage(run, "tok_train", end=1)
    row = next(line for line in report.build_report(run).splitlines() if line.startswith("| Tokens |"))
    assert re.fullmatch(r"\| Tokens \| [\d,]+ \|", row)


def test_code_tokens_are_a_dash_before_tok_train(run):
    environment(run, [])
    stage(run, "tok_train", end=1)
    assert "| Tokens | — |" in report.build_report(run)


def test_cli_writes_report_md(run):
    stage(run, "tok_train", end=1)
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", "--run-dir", str(run), "--print"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    written = (run / "report.md").read_text()
    assert "# Report card: run 20260101-000000-abc123" in written
    assert "(`tok_train`)" in proc.stdout
