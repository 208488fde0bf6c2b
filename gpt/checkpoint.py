"""Checkpoints that a kill at any moment cannot corrupt.

Layout under <run-dir>/checkpoints/<stage>/:

    step_000500/
        model.safetensors          fp32 weights (rank 0); safetensors, never pickle
        optim_rank0.safetensors    each rank's optimizer shard (state is sharded across ranks)
        loader_rank0.json          each rank's exact data-loader position
        meta.json                  step, model config, run config, loop state, world size

Every rank writes into `step_000500.tmp/`; after a barrier rank 0 writes
meta.json last and renames the folder. A folder without meta.json or the
weights, or still named .tmp, is never "latest", so an interrupted save leaves
the previous checkpoint as the one to resume from. Deleting works the other
way round: the folder is first renamed to `step_000500.deleting`, so a kill
during the deletion never leaves a half-deleted `step_N` that looks whole;
the next prune removes such leftovers. A resume takes the newest checkpoint
that has every file it needs (optimizer shards and loader positions of every
rank that saved it), on any number of ranks that divides the data streams:
the optimizer state is re-sharded on load. The run directory must be on a
filesystem every node sees for multi-node runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.checkpoints import CHECKPOINT_DIR, complete_checkpoints, missing_files, read_meta
from pipeline.events import write_json_atomic


def _barrier(ctx):
    if ctx is not None and ctx.distributed:
        dist.barrier()


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_state(model) -> dict[str, torch.Tensor]:
    """Plain fp32 tensors with compile's `_orig_mod.` prefix removed, contiguous and unshared."""
    out = {}
    for name, t in model.state_dict().items():
        out[name.replace("_orig_mod.", "")] = t.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def save(root: str | os.PathLike, step: int, model, optimizer, loader_state: dict | None, meta: dict, ctx=None,
         keep_last: int = 3) -> Path:
    """Write one checkpoint collectively (every rank calls this); return its folder."""
    root = Path(root)
    rank = ctx.rank if ctx is not None else 0
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ctx)
    if rank == 0:
        save_file(model_state(model), str(tmp / "model.safetensors"))
    if optimizer is not None:
        shard = {k: v.detach().to("cpu").contiguous().clone() for k, v in optimizer.shard_state().items()}
        save_file(shard, str(tmp / f"optim_rank{rank}.safetensors"))
    if loader_state is not None:
        write_json_atomic(tmp / f"loader_rank{rank}.json", loader_state)
    _barrier(ctx)
    if rank == 0:
        world = ctx.world_size if ctx is not None else 1
        # What every rank wrote, so a resume can tell a whole checkpoint from one a kill damaged.
        write_json_atomic(tmp / "meta.json", {**meta, "step": step, "world_size": world,
                                              "optimizer": optimizer is not None, "loader": loader_state is not None})
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            _delete(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier(ctx)
    return final


def _delete(folder: Path):
    """Remove a checkpoint folder so that no kill leaves it looking whole.

    rmtree deletes file by file: a kill half way used to leave step_N with meta.json but no weights,
    still listed as complete. The rename takes the folder out of the step_N names in one atomic step.
    """
    trash = folder.with_name(folder.name + ".deleting")
    if trash.exists():  # a leftover of an earlier killed deletion of the same step
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    _fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: str | os.PathLike, keep_last: int):
    """Delete all but the newest `keep_last` complete checkpoints (keep_last <= 0: keep all), and leftovers."""
    root = Path(root)
    if keep_last > 0:
        for p in complete_checkpoints(root)[:-keep_last]:
            _delete(p)
    # Leftovers: saves and deletions a kill interrupted, and step folders without meta.json or weights
    # (half deleted by a cleanup from before deletions renamed first). None of them can be loaded.
    complete = set(complete_checkpoints(root))
    for p in root.glob("step_*"):
        if not p.is_dir():
            continue
        if p.name.endswith((".tmp", ".deleting")):
            shutil.rmtree(p, ignore_errors=True)
        elif CHECKPOINT_DIR.match(p.name) and p not in complete:
            _delete(p)


def rng_state() -> dict:
    """This process's random generators (CPU and, if used, CUDA), as JSON-friendly lists.

    Pretraining draws no random numbers after initialisation today (no
    dropout, greedy samples), but a stage that does (sampling in RL, say)
    must continue the same stream after a pause.
    """
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def load_model(path: str | os.PathLike, model, device="cpu"):
    """Load weights into `model` (strict: every name and shape must match)."""
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no model.safetensors (its save or deletion was interrupted); "
                                "pick another step")
    state = load_file(str(weights), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                           "was it saved with a different depth or vocabulary?")
    return model


def load(path: str | os.PathLike, model, optimizer, ctx=None, device="cpu") -> tuple[dict, list[dict | None]]:
    """Restore the model and this rank's share of the optimizer state; return (meta, loader states).

    The checkpoint may come from any number of ranks: the optimizer state is re-sharded for this
    run's ranks (each reads only its own rows and matrices). The loader states are those of every
    rank that saved it, in rank order (None where a rank saved none); the caller maps them onto its ranks.
    """
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}): a save or cleanup "
                                "was killed; resume from an older step or delete this folder")
    meta = read_meta(path)
    saved_world = meta.get("world_size", 1)
    load_model(path, model, device)
    if optimizer is not None:
        with contextlib.ExitStack() as files:
            shards = [files.enter_context(safe_open(str(path / f"optim_rank{r}.safetensors"), framework="pt"))
                      for r in range(saved_world)]
            optimizer.load_resharded_state(shards)
    loaders = []
    for r in range(saved_world):
        loader_file = path / f"loader_rank{r}.json"
        loaders.append(json.loads(loader_file.read_text()) if loader_file.exists() else None)
    return meta, loaders


def load_for_inference(path: str | os.PathLike, device="cpu"):
    """(model in eval mode, meta) from a checkpoint folder, on `device`."""
    from gpt.model import GPTConfig, build_model

    meta = read_meta(path)
    model = build_model(GPTConfig.from_dict(meta["model_config"]), device)
    load_model(path, model, device=device)
    model.eval()
    return model, meta
