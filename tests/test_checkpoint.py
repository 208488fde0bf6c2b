"""Checkpoints on disk: a kill inside a cleanup never leaves one that looks whole; resume takes the newest whole one."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from pipeline import checkpoints
from gpt import checkpoint
from pipeline.checkpoints import complete_checkpoints, latest_checkpoint
from gpt.model import GPTConfig, build_model
from gpt.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=64)


def save_steps(run_dir, steps, keep_last=10):
    """Whole base_train checkpoints (weights, optimizer, loader position, meta) of a tiny model at `steps`."""
    torch.manual_seed(0)
    model = build_model(TINY, "cpu")
    optimizer = build_optimizer(model)
    root = checkpoints.stage_dir(run_dir, "base_train")
    for step in steps:
        checkpoint.save(root, step, model, optimizer, {"streams": [{"step": step}]},
                        {"model_config": TINY.to_dict()}, keep_last=keep_last)
    return root, model, optimizer


def step_folders(root):
    return sorted(p.name for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name))


def test_a_kill_inside_pruning_never_leaves_a_checkpoint_that_looks_whole(tmp_path, monkeypatch):
    root, _, _ = save_steps(tmp_path, [10, 20, 30])
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        # The worst order rmtree can take: the weights go first, then the kill lands; meta.json survives.
        (checkpoint.Path(path) / "model.safetensors").unlink(missing_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(root, keep_last=2)  # deleting step 10
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)

    # No step_N folder is left without its files: the one being deleted had left the step_N names first.
    assert step_folders(root) == ["step_000020", "step_000030"]
    assert [p.name for p in complete_checkpoints(root)] == ["step_000020", "step_000030"]
    for p in complete_checkpoints(root):
        model, meta = checkpoint.load_for_inference(p)  # what the chat page offers loads
        assert meta["step"] in (20, 30)
    with pytest.raises(FileNotFoundError, match=r"available: \{'base_train': \[20, 30\]\}"):
        checkpoints.find(tmp_path, "base_train", 10)
    # the half-deleted leftover goes at the next prune
    assert [p.name for p in root.iterdir() if p.name.endswith(".deleting")] == ["step_000010.deleting"]
    checkpoint.prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_000020", "step_000030"]


def test_a_step_folder_with_meta_but_no_weights_is_never_offered(tmp_path):
    root, _, _ = save_steps(tmp_path, [10, 20])
    # what a kill inside the old pruning (rmtree of step_N in place) left: meta.json without the weights
    broken = root / "step_000030"
    shutil.copytree(root / "step_000020", broken)
    (broken / "model.safetensors").unlink()
    (broken / "meta.json").write_text(json.dumps({**checkpoints.read_meta(root / "step_000020"), "step": 30}))

    assert [p.name for p in complete_checkpoints(root)] == ["step_000010", "step_000020"]
    assert latest_checkpoint(root).name == "step_000020"  # what the studio resumes from
    assert checkpoints.find(tmp_path).name == "step_000020"  # what the chat page and chat CLI open by default
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for stage base_train, step 30"):
        checkpoints.find(tmp_path, "base_train", 30)
    with pytest.raises(FileNotFoundError, match="no model.safetensors .* pick another step"):
        checkpoint.load_for_inference(broken)  # a path kept from before (a conversation's checkpoint)
    path, skipped = checkpoints.latest_resumable(root)
    assert path.name == "step_000020" and skipped == [(broken, ["model.safetensors"])]
    checkpoint.prune(root, keep_last=3)  # the next save's cleanup removes it
    assert step_folders(root) == ["step_000010", "step_000020"]


def test_resume_takes_the_newest_checkpoint_with_every_rank_s_files(tmp_path):
    root, model, optimizer = save_steps(tmp_path, [10, 20, 30])
    meta20 = checkpoints.read_meta(root / "step_000020")
    assert meta20["world_size"] == 1 and meta20["optimizer"] and meta20["loader"]
    (root / "step_000030" / "optim_rank0.safetensors").unlink()
    # a 2-rank checkpoint that lacks rank 1's loader position: whole for a chat, not for a resume
    two = root / "step_000040"
    shutil.copytree(root / "step_000020", two)
    shutil.copy(two / "optim_rank0.safetensors", two / "optim_rank1.safetensors")
    (two / "meta.json").write_text(json.dumps({**meta20, "step": 40, "world_size": 2}))

    assert latest_checkpoint(root).name == "step_000040"
    path, skipped = checkpoints.latest_resumable(root)
    assert path.name == "step_000020"
    assert [(p.name, missing) for p, missing in skipped] == [("step_000040", ["loader_rank1.json"]),
                                                             ("step_000030", ["optim_rank0.safetensors"])]
    with pytest.raises(FileNotFoundError, match=r"step_000030 is incomplete \(missing optim_rank0.safetensors\)"):
        checkpoint.load(root / "step_000030", model, optimizer)
    meta, loaders = checkpoint.load(path, model, optimizer)
    assert meta["step"] == 20 and loaders == [{"streams": [{"step": 20}]}]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    root, model, optimizer = save_steps(tmp_path, [10])
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    checkpoint.save(root, 10, model, optimizer, {"streams": []}, {"model_config": TINY.to_dict()})
    assert sorted(p.name for p in root.iterdir()) == ["step_000010"]
    loaded, _ = checkpoint.load_for_inference(root / "step_000010")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
