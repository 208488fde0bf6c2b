"""Checkpoints that a kill at any moment cannot corrupt.

Layout under <run-dir>/checkpoints/<stage>/:

    step_000500/
        model.safetensors          fp32 weights (rank 0); safetensors, never pickle
        optim_rank0.safetensors    each rank's optimizer shard (state is sharded across ranks)
        loader_rank0.json          each rank's exact data-loader position
        meta.json                  step, model config, run config, loop state, world size

Every rank writes into `step_000500.tmp/`; after a barrier rank 0 writes
meta.json last and renames the folder. A folder without meta.json, or still
named .tmp, is never "latest", so an interrupted save leaves the previous
checkpoint as the one to resume from. The run directory must be on a
filesystem every node sees for multi-node runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from trainer.events import complete_checkpoints, latest_checkpoint as latest, write_json_atomic  # noqa: F401 (re-exported)



def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


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
        write_json_atomic(tmp / "meta.json", {**meta, "step": step, "world_size": world})
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    _barrier(ctx)
    return final


def prune(root: str | os.PathLike, keep_last: int):
    if keep_last <= 0:
        return
    for p in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    # leftovers of saves that were killed half way
    for p in Path(root).glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


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


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_model(path: str | os.PathLike, model, device="cpu"):
    """Load weights into `model` (strict: every name and shape must match)."""
    state = load_file(str(Path(path) / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                           "was it saved with a different depth or vocabulary?")
    return model


def load(path: str | os.PathLike, model, optimizer, ctx=None, device="cpu") -> tuple[dict, dict | None]:
    """Restore model, this rank's optimizer shard and loader position; return (meta, loader_state)."""
    path = Path(path)
    meta = read_meta(path)
    world = ctx.world_size if ctx is not None else 1
    rank = ctx.rank if ctx is not None else 0
    if meta.get("world_size", 1) != world:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta.get('world_size')} ranks but this run has {world}; "
            "optimizer state and data positions are sharded per rank, so resume with the same number of GPUs"
        )
    load_model(path, model, device)
    if optimizer is not None:
        optimizer.load_shard_state(load_file(str(path / f"optim_rank{rank}.safetensors"), device=str(device)))
    loader_file = path / f"loader_rank{rank}.json"
    loader_state = json.loads(loader_file.read_text()) if loader_file.exists() else None
    return meta, loader_state


# Stages whose checkpoints hold a model, most advanced first: what a chat should load by default.
MODEL_STAGES = ["rl_train", "sft_train", "mid_train", "base_train"]


def find(run_dir: str | os.PathLike, stage: str | None = None, step: int | None = None) -> Path:
    """The checkpoint folder to load: the given stage and step, or the latest of the most advanced stage.

    Raises FileNotFoundError naming what exists, so a person can pick another.
    """
    run_dir = Path(run_dir)
    stages = [stage] if stage else MODEL_STAGES
    for name in stages:
        done = complete_checkpoints(stage_dir(run_dir, name))
        if step is not None:
            done = [p for p in done if read_meta(p).get("step") == step]
        if done:
            return done[-1]
    available = {name: [read_meta(p).get("step") for p in complete_checkpoints(stage_dir(run_dir, name))] for name in MODEL_STAGES}
    available = {k: v for k, v in available.items() if v}
    wanted = f"stage {stage or 'any'}" + (f", step {step}" if step is not None else "")
    raise FileNotFoundError(f"no checkpoint for {wanted} in {run_dir}; available: {available or 'none (train a model first)'}")


def load_for_inference(path: str | os.PathLike, device="cpu"):
    """(model in eval mode, meta) from a checkpoint folder, on `device`."""
    from trainer.model import GPTConfig, build_model

    meta = read_meta(path)
    model = build_model(GPTConfig.from_dict(meta["model_config"]), device)
    load_model(path, model, device=device)
    model.eval()
    return model, meta
