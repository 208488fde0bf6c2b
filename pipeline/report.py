"""The run's report card: environment, code size, each stage, summary table, time and cost.

Everything is rebuilt from the run directory (config.json, environment.json,
events.jsonl), so the report can be regenerated at any moment, also while a
run is still going, and a reader never depends on a stage having called it.

    python -m pipeline.report --run-dir runs/<id>            # writes runs/<id>/report.md
    python -m pipeline.report --run-dir runs/<id> --print    # ... and prints it

The studio calls `capture_environment(run_dir)` once when a run starts and
`build_report(run_dir)` / `write_report(run_dir)` whenever it wants the card.

Summary-table contract for evaluation stages: an `eval` event from an
evaluation stage fills that stage's column (its `report_column` in
pipeline/stages.py: base_eval -> BASE, mid_eval -> MID, sft_eval -> SFT,
rl_eval -> RL). The row is the event's `name` (compared case-insensitively,
ignoring '-', '_' and spaces), the number its `value` field, else the field
named like `name`, else `score`, else `accuracy`. An event with a `suite` (one of the
tasks a suite score averages, e.g. CORE's arc_easy) is listed in its stage's section only,
and a `coverage` (e.g. "18/22": a score over part of its suite) is shown beside the
number. Each stage's section is
titled with its `title` there, and the cost uses pipeline/hardware.py's prices.

Every string that comes from events or the config is untrusted: it is escaped
here so it cannot break a table, and the studio's renderer sanitises the HTML
again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from pipeline import hardware, stages
from pipeline.events import CONFIG_FILE, read_events, write_json_atomic

ENVIRONMENT_FILE = "environment.json"
REPORT_FILE = "report.md"
REPO_ROOT = Path(__file__).resolve().parents[1]

CODE_EXTENSIONS = {".py", ".rs", ".js", ".html", ".css", ".sh", ".toml", ".md"}
PACKAGES = ("torch", "django", "tokenizers")
MISSING = "—"

# Summary table: rows in display order, keyed by their normalised name.
SUMMARY_ROWS = (
    ("core", "CORE"),
    ("arceasy", "ARC-Easy"),
    ("arcchallenge", "ARC-Challenge"),
    ("mmlu", "MMLU"),
    ("gsm8k", "GSM8K"),
    ("humaneval", "HumanEval"),
    ("chatcore", "ChatCORE"),
)
# Short names the reference project used for the ARC rows.
METRIC_ALIASES = {"arce": "arceasy", "arcc": "arcchallenge"}
ENVELOPE = {"time", "stage", "kind", "seq"}


# --- environment -----------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            # x86 says "model name"; some ARM kernels only give "Hardware" or "Model".
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[dict]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    gpus = []
    for line in (out or "").splitlines():
        name, _, memory = line.rpartition(",")
        if not name.strip():
            continue
        try:
            memory_mib = int(memory.split()[0])  # "81559 MiB"
        except (ValueError, IndexError):
            memory_mib = None
        gpus.append({"name": name.strip(), "memory_mib": memory_mib})
    return gpus


def _package_versions() -> dict:
    # Metadata only: importing torch would take seconds and initialise CUDA in the studio.
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_info(root: Path) -> dict | None:
    commit = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    if not commit:
        return None
    branch = _run(["git", "-C", str(root), "rev-parse", "--abbrev-ref", "HEAD"])
    status = _run(["git", "-C", str(root), "status", "--porcelain"])
    return {"commit": commit.strip(), "branch": (branch or "").strip() or None,
            "dirty": None if status is None else bool(status.strip())}


def _is_code_file(rel: str) -> bool:
    path = Path(rel)
    if path.suffix not in CODE_EXTENSIONS:
        return False
    if path.name.endswith(".lock") or "-lock." in path.name or "runs" in path.parts[:-1]:
        return False
    return not rel.startswith("tests/data/")


def code_files(root: Path = REPO_ROOT) -> list[Path]:
    """The repository's source files: tracked by git, else found by walking the project tree."""
    listed = _run(["git", "-C", str(root), "ls-files"])
    if listed is not None:
        rels = listed.splitlines()
    elif (root / "pyproject.toml").exists():
        rels = []
        for dirpath, dirnames, filenames in os.walk(root):
            # Prune what is never source: hidden folders (.git, .venv), builds, caches, run outputs.
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in
                           ("runs", "node_modules", "target", "__pycache__", "build", "dist", "staticfiles")
                           and not d.endswith(".egg-info")]
            rel_dir = Path(dirpath).relative_to(root)
            rels += [(rel_dir / f).as_posix() for f in filenames]
    else:
        # Installed as a package (site-packages): walking there would count other projects.
        return []
    return [root / rel for rel in sorted(rels) if _is_code_file(rel) and (root / rel).is_file()]


def _dependency_count(root: Path) -> int | None:
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        return None
    try:
        with open(root / "pyproject.toml", "rb") as f:
            return len(tomllib.load(f).get("project", {}).get("dependencies", []))
    except (OSError, ValueError):
        return None


def code_size(root: Path = REPO_ROOT) -> dict:
    chars = lines = 0
    files = code_files(root)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        chars += len(text)
        lines += text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return {"characters": chars, "lines": lines, "files": len(files), "dependencies": _dependency_count(root)}


def capture_environment(run_dir: str | os.PathLike) -> dict:
    """Record where and with what code the run happens, in <run>/environment.json."""
    env = {
        "captured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count()},
        "memory_gb": _memory_gb(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "packages": _package_versions(),
        "git": _git_info(REPO_ROOT),
        "code": code_size(REPO_ROOT),
    }
    write_json_atomic(Path(run_dir) / ENVIRONMENT_FILE, env)
    return env


_token_cache: dict[tuple, int] = {}


def code_tokens(run_dir: str | os.PathLike, root: Path = REPO_ROOT) -> int | None:
    """Tokens of the repository's code with this run's tokenizer, or None before tok_train."""
    path = Path(run_dir) / "tokenizer" / "tokenizer.json"
    files = code_files(root)
    if not path.is_file() or not files:
        return None
    # The studio rebuilds the card often; the count only changes with the tokenizer or the code.
    key = (str(path), path.stat().st_mtime_ns, tuple((str(p), p.stat().st_mtime_ns) for p in files))
    if key not in _token_cache:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
        except Exception:  # a missing package or a foreign/corrupt file: the count is optional
            return None
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        _token_cache.clear()
        _token_cache[key] = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return _token_cache[key]


# --- Markdown helpers --------------------------------------------------------------------------

def md_text(value, limit: int = 300) -> str:
    """Untrusted text made inert for Markdown: one line, no HTML, no table or code delimiters."""
    text = re.sub(r"\s+", " ", str(value)).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([\\`*|\[\]])", r"\\\1", text)
    # Underscores only matter at word edges (emphasis); inside names they stay readable.
    return re.sub(r"(?<!\w)_|_(?!\w)", r"\\_", text)


def md_code(value, limit: int = 300) -> str:
    """Untrusted text shown verbatim in a code span (Markdown escapes HTML inside code).

    Backticks and pipes are swapped for look-alikes because no escape works
    inside a code span in every Markdown flavour. The spaces inside the
    delimiters (stripped by renderers) keep a trailing backslash away from
    the closing backtick, for table parsers that would read it as an escape.
    """
    text = str(value).replace("\r\n", "\n").replace("\n", "⏎").replace("`", "ˋ").replace("|", "¦")
    text = re.sub(r"\s", " ", text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"` {text} `" if text.strip() else "*(empty)*"


def fmt_number(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value != 0 and (abs(value) >= 1e9 or abs(value) < 1e-3):
            return f"{value:.4e}"
        return f"{value:,.4f}" if abs(value) >= 10_000 else f"{value:.4f}"
    return md_text(value)


def fmt_value(value) -> str:
    """Any event value for a table cell: numbers formatted, the rest escaped."""
    if value is None or isinstance(value, (bool, int, float)):
        return fmt_number(value)
    if isinstance(value, str):
        return md_text(value) if value else "*(empty)*"
    return md_code(json.dumps(value, separators=(",", ":"), default=str), limit=200)


def format_duration(seconds: float | None) -> str:
    """0.4 s, 12.3 s, 4 m 05 s, 3 h 07 m, 2 d 04 h ("" for None). Used by the report, the pages and the estimate."""
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


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; cells must already be escaped."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def key_value_table(title: str, fields: dict) -> list[str]:
    return table([title, "Value"], [[md_text(k), fmt_value(v)] for k, v in fields.items()])


# --- metric lookup for the summary -------------------------------------------------------------

def normalise_metric(name) -> str:
    key = re.sub(r"[-_\s]", "", str(name)).lower()
    return METRIC_ALIASES.get(key, key)


def eval_value(event: dict) -> float | None:
    """The number an eval event reports: `value`, else the field named like `name`, else score/accuracy."""
    for key in ("value", event.get("name"), "score", "accuracy"):
        if isinstance(key, str) and key not in ENVELOPE:
            value = event.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def _summary_events(events: list[dict]):
    """(row key, column, event) of the eval events that fill the summary table, in order."""
    columns = dict(stages.summary_columns())
    rows = {key for key, _ in SUMMARY_ROWS}
    for e in events:
        if e.get("kind") != "eval" or e.get("stage") not in columns or e.get("suite"):
            continue
        row = normalise_metric(e.get("name", ""))
        if row in rows and eval_value(e) is not None:
            yield row, columns[e["stage"]], e


def summary_values(events: list[dict]) -> dict[tuple[str, str], float]:
    """{(row key, column): value} from the eval stages; a later event overrides an earlier one."""
    return {(row, column): eval_value(e) for row, column, e in _summary_events(events)}


def summary_table(events: list[dict]) -> list[str]:
    chosen = {(row, column): e for row, column, e in _summary_events(events)}
    columns = [column for _, column in stages.summary_columns()]
    rows = []
    for key, label in SUMMARY_ROWS:
        cells = [label]
        for column in columns:
            e = chosen.get((key, column))
            if e is None:
                cells.append(MISSING)
                continue
            coverage = e.get("coverage")
            cells.append(f"{eval_value(e):.4f}" + (f" ({md_text(coverage, 20)})" if isinstance(coverage, str) and coverage else ""))
        rows.append(cells)
    return table(["Metric"] + columns, rows)


# --- cost ---------------------------------------------------------------------------------------

def cost_line(env: dict | None, wall_seconds: float | None) -> str:
    if env is None:
        return "**Estimated cost:** unknown (environment not recorded)"
    gpus = [g for g in env.get("gpus") or [] if isinstance(g, dict)]
    if not gpus:
        return "**Estimated cost:** CPU only, no GPU cost"
    if wall_seconds is None:
        return "**Estimated cost:** unknown (no timed events yet)"
    hours = wall_seconds / 3600
    hourly = sum(hardware.gpu_hour_price(str(g.get("name", ""))) for g in gpus)  # pipeline/hardware.py's prices
    names = sorted({str(g.get("name", "")) for g in gpus})
    return (f"**Estimated cost:** {hours * hourly:,.2f} USD ({hours * len(gpus):,.2f} GPU-hours on "
            f"{len(gpus)} × {md_text(', '.join(names))}, {hourly / len(gpus):.2f} USD per GPU-hour)")


# --- stage sections -----------------------------------------------------------------------------

def _stage_order(events: list[dict]) -> list[str]:
    order = []
    for e in events:
        stage = e.get("stage")
        if isinstance(stage, str) and stage not in order:
            order.append(stage)
    return order


def _times(events: list[dict]) -> list[float]:
    return [e["time"] for e in events if isinstance(e.get("time"), (int, float)) and not isinstance(e["time"], bool)]


def stage_timing(events: list[dict]) -> tuple[str, float | None, int]:
    """(status, seconds, attempts) of one stage's events.

    A stage may be run again (resume, retry): each stage_start opens an
    attempt, lasting to its stage_end or, while running or after a kill, its
    last event. The status is that of the last attempt.
    """
    attempts: list[list[dict]] = []
    for e in events:
        if e.get("kind") == "stage_start" or not attempts:
            attempts.append([])
        attempts[-1].append(e)
    seconds = None
    for attempt in attempts:
        times = _times(attempt)
        if times:
            seconds = (seconds or 0.0) + max(times) - min(times)
    ends = [e for e in attempts[-1] if e.get("kind") == "stage_end"] if attempts else []
    status = str(ends[-1].get("status") or "ended") if ends else "did not finish"
    return status, seconds, sum(1 for e in events if e.get("kind") == "stage_start")


def _parameters(events: list[dict]) -> dict:
    params = {}
    starts = [e for e in events if e.get("kind") == "stage_start"]
    if starts and isinstance(starts[-1].get("args"), dict):
        params.update(starts[-1]["args"])
    for e in events:
        if e.get("kind") == "setup":
            for key, value in e.items():
                if key in ENVELOPE:
                    continue
                if key == "model_config" and isinstance(value, dict):
                    params.update({f"model.{k}": v for k, v in value.items()})
                else:
                    params[key] = value
    return params


def _tokenizer_eval(event: dict) -> list[str]:
    encoders = [str(e) for e in event.get("encoders") or [] if isinstance(e, (str, int))]
    peers = [e for e in encoders if e != "ours"]
    headers = ["Domain", "Bytes"] + [f"{md_text(e)} bytes/token" for e in encoders] + [f"vs {md_text(p)}" for p in peers]
    rows = []
    for row in event.get("rows") or []:
        if not isinstance(row, dict):
            continue
        cells = [md_text(row.get("domain", "")), fmt_value(row.get("bytes"))]
        for e in encoders:
            value = row.get(f"{e}_bytes_per_token")
            cells.append(f"{value:.2f}" if isinstance(value, (int, float)) else MISSING)
        for p in peers:
            value = row.get(f"vs_{p}_pct")
            cells.append(f"{value:+.1f}%" if isinstance(value, (int, float)) else MISSING)
        rows.append(cells)
    lines = ["Compression (bytes per token, higher is better; vs = how many fewer tokens we need):", ""]
    lines += table(headers, rows)
    if event.get("vocab_size") is not None:
        lines += [f"Vocabulary size: {fmt_value(event.get('vocab_size'))}", ""]
    notes = [n for n in event.get("notes") or [] if isinstance(n, str)]
    lines += [f"- {md_text(n)}" for n in notes] + ([""] if notes else [])
    return lines


def _val_bpb(evals: list[dict]) -> list[str]:
    points = [(e.get("step"), e["val_bpb"]) for e in evals if isinstance(e.get("val_bpb"), (int, float))]
    if not points:
        return []
    best = min(points, key=lambda p: p[1])
    rows = [[label, fmt_number(float(bpb)), fmt_value(step)]
            for label, (step, bpb) in (("first", points[0]), ("min", best), ("last", points[-1]))]
    return ["Validation bits per byte:", ""] + table(["val_bpb", "Value", "Step"], rows)


def _samples(event: dict) -> list[str]:
    samples = [s for s in event.get("samples") or [] if isinstance(s, dict)]
    if not samples:
        return []
    rows = [[md_code(s.get("prompt", "")), md_code(s.get("completion", ""))] for s in samples]
    return [f"Samples at step {fmt_value(event.get('step'))}:", ""] + table(["Prompt", "Completion"], rows)


def stage_section(stage: str, events: list[dict]) -> list[str]:
    known = stages.BY_NAME.get(stage)  # events may name a stage this version does not have
    title = known.title if known else None
    heading = f"{title} (`{stage}`)" if title else md_text(stage)
    status, seconds, attempts = stage_timing(events)
    lines = [f"## {heading}", ""]
    lines.append(f"- **Status:** {md_text(status)}")
    lines.append(f"- **Duration:** {format_duration(seconds) or MISSING}" + (f" over {attempts} attempts" if attempts > 1 else ""))
    errors = [e for e in events if e.get("kind") == "error"]
    if errors:
        lines.append(f"- **Last error:** {md_text(errors[-1].get('message', ''))}")
    lines.append("")

    params = _parameters(events)
    if params:
        lines += key_value_table("Parameter", params)

    for e in events:
        if e.get("kind") == "result":
            lines += key_value_table("Result", {k: v for k, v in e.items() if k not in ENVELOPE})

    metrics = [e for e in events if e.get("kind") == "metric"]
    if metrics:
        last = {k: v for k, v in metrics[-1].items() if k not in ENVELOPE}
        lines += key_value_table("Last metric", last)

    evals = [e for e in events if e.get("kind") == "eval"]
    for e in evals:
        if e.get("name") == "tokenizer":
            lines += _tokenizer_eval(e)
    lines += _val_bpb([e for e in evals if e.get("name") == "val_bpb"])
    others = [e for e in evals if e.get("name") not in ("tokenizer", "val_bpb")]
    if others:
        rows = [[md_text(e.get("name", "")), fmt_number(eval_value(e)), fmt_value(e.get("step"))] for e in others]
        lines += table(["Eval", "Value", "Step"], rows)

    samples = [e for e in events if e.get("kind") == "sample"]
    if samples:
        lines += _samples(samples[-1])
    return lines


# --- the report ---------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def environment_section(env: dict | None) -> list[str]:
    lines = ["## Environment", ""]
    if not isinstance(env, dict):
        return lines + ["Environment not recorded.", ""]
    cpu = env.get("cpu") or {}
    gpus = env.get("gpus") or []
    git = env.get("git") or {}
    packages = env.get("packages") or {}
    kinds: dict[str, int] = {}  # "8 x H100 (81559 MiB)" rather than eight times the same name
    for g in gpus:
        if isinstance(g, dict):
            label = f"{g.get('name', '?')} ({g.get('memory_mib') or '?'} MiB)"
            kinds[label] = kinds.get(label, 0) + 1
    gpu_text = ", ".join(f"{n} × {label}" for label, n in kinds.items())
    git_text = MISSING
    if git.get("commit"):
        state = {True: "dirty", False: "clean"}.get(git.get("dirty"), "state unknown")
        git_text = f"{git['commit'][:12]} on {git.get('branch') or '?'} ({state})"
    fields = {
        "Captured": env.get("captured_at"),
        "Host": env.get("hostname"),
        "Platform": env.get("platform"),
        "CPU": f"{cpu.get('model') or '?'} × {cpu.get('cores') or '?'} logical cores",
        "RAM": f"{env['memory_gb']} GB" if env.get("memory_gb") is not None else None,
        "GPUs": gpu_text or "none",
        "Python": env.get("python"),
        **{name: packages.get(name) for name in PACKAGES},
        "Git": git_text,
    }
    return lines + key_value_table("Item", fields)


def code_section(env: dict | None, tokens: int | None) -> list[str]:
    code = (env or {}).get("code") if isinstance(env, dict) else None
    lines = ["## Code size", ""]
    if not isinstance(code, dict):
        return lines + ["Code size not recorded.", ""]
    fields = {"Characters": code.get("characters"), "Lines": code.get("lines"), "Files": code.get("files"),
              "Tokens": tokens, "Dependencies": code.get("dependencies")}
    return lines + key_value_table("Measure", fields)


def build_report(run_dir: str | os.PathLike) -> str:
    """The report card of a run, as Markdown."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / CONFIG_FILE)
    config = config if isinstance(config, dict) else {}
    env = _read_json(run_dir / ENVIRONMENT_FILE)
    env = env if isinstance(env, dict) else None
    events, _ = read_events(run_dir)
    events = [e for e in events if e.get("kind") != "corrupt" and isinstance(e.get("stage"), str)]

    preset = config.get("preset") or "custom"
    lines = [f"# Report card: run {md_text(run_dir.name)}", ""]
    lines.append(f"- **Preset:** {md_text(preset)}")
    if config.get("description"):
        lines.append(f"- **Description:** {md_text(config['description'])}")
    lines.append(f"- **Generated:** {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
    lines.append("")
    if not events:
        return "\n".join(lines + ["No events recorded yet: no stage of this run has started.", ""])

    lines += environment_section(env)
    lines += code_section(env, code_tokens(run_dir))
    for stage in _stage_order(events):
        lines += stage_section(stage, [e for e in events if e["stage"] == stage])

    lines += ["## Summary", ""] + summary_table(events)
    times = _times(events)
    wall = max(times) - min(times) if times else None
    lines.append(f"**Total wall-clock time:** {format_duration(wall) or MISSING}")
    lines.append("")
    lines.append(cost_line(env, wall))
    lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike) -> Path:
    """Build the report and write <run>/report.md atomically (temp file + rename)."""
    path = Path(run_dir) / REPORT_FILE
    text = build_report(run_dir)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Build a run's report card (report.md) from its run directory.")
    parser.add_argument("--run-dir", required=True, help="the run directory, e.g. runs/<id>")
    parser.add_argument("--print", action="store_true", help="also print the report to stdout")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"{args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    path = write_report(args.run_dir)
    if args.print:
        print(path.read_text(encoding="utf-8"))
    else:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
