"""Finding checkpoints in a run directory, without torch.

A checkpoint is a folder `<run>/checkpoints/<stage>/step_NNNNNN/` (gpt/checkpoint.py writes and
loads them). Everything here only looks at folders and meta.json, so the studio, `runjob` and
the chat list find a stage's checkpoints and resume points without importing torch:

    from pipeline import checkpoints
    checkpoints.latest_checkpoint(checkpoints.stage_dir("runs/abc", "base_train"))
    checkpoints.find("runs/abc")          # what a chat loads: the newest of the most advanced stage
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipeline import stages as stage_table


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


CHECKPOINT_DIR = re.compile(r"^step_(\d+)$")
# What makes a checkpoint loadable: meta.json (a save writes it last) and the weights. Checking for the
# files, not just the folder name, keeps a folder that an old or killed cleanup left half deleted out.
CHECKPOINT_FILES = ("meta.json", "model.safetensors")


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Finished checkpoints under checkpoints/<stage>/ (renamed, with meta.json and the weights), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_DIR.match(p.name)
        if m and all((p / name).is_file() for name in CHECKPOINT_FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def missing_files(path: str | os.PathLike) -> list[str]:
    """The files a resume from `path` needs that are not there: meta.json, the weights, and the optimizer
    shard and loader position of every rank that saved it ([] for a whole checkpoint)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        return ["meta.json"]
    meta = read_meta(path)
    # Checkpoints from before meta said what was saved: base_train's, which always saved both.
    world = meta.get("world_size", 1)
    need = ["model.safetensors"]
    need += [f"optim_rank{r}.safetensors" for r in range(world)] if meta.get("optimizer", True) else []
    need += [f"loader_rank{r}.json" for r in range(world)] if meta.get("loader", True) else []
    return [name for name in need if not (path / name).is_file()]



def latest_resumable(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest checkpoint a resume can use, and the newer step folders skipped with the files they lack."""
    root = Path(root)
    folders = []
    if root.is_dir():
        folders = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and p.is_dir())
    skipped = []
    for _, p in reversed(folders):
        missing = missing_files(p)
        if not missing:
            return p, skipped
        skipped.append((p, missing))
    return None, skipped



def find(run_dir: str | os.PathLike, stage: str | None = None, step: int | None = None) -> Path:
    """The checkpoint folder to load: the given stage and step, or the latest of the most advanced stage.

    Raises FileNotFoundError naming what exists, so a person can pick another.
    """
    run_dir = Path(run_dir)
    for name in [stage] if stage else stage_table.model_stages():
        done = complete_checkpoints(stage_dir(run_dir, name))
        if step is not None:
            done = [p for p in done if read_meta(p).get("step") == step]
        if done:
            return done[-1]
    available = {name: [read_meta(p).get("step") for p in complete_checkpoints(stage_dir(run_dir, name))] for name in stage_table.model_stages()}
    available = {k: v for k, v in available.items() if v}
    wanted = f"stage {stage or 'any'}" + (f", step {step}" if step is not None else "")
    raise FileNotFoundError(f"no checkpoint for {wanted} in {run_dir}; available: {available or 'none (train a model first)'}")
