"""Finding and loading a checkpoint to run a model from (the chat CLI and chat page start here)."""

from __future__ import annotations


import pytest

from tests.helpers import save_test_checkpoints
from pipeline import checkpoints
from gpt import checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir with a small random model saved as two base checkpoints and one sft checkpoint."""
    import torch

    from gpt.model import GPTConfig, build_model

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = build_model(cfg, "cpu")
    save_test_checkpoints(run, model, [("base_train", 10), ("base_train", 20), ("sft_train", 5)])
    (checkpoints.stage_dir(run, "sft_train") / "step_000009.tmp").mkdir()  # an interrupted save: never chosen
    return run, model


def test_find_prefers_the_most_advanced_stage_and_its_latest_step(run):
    run_dir, _ = run
    assert checkpoints.find(run_dir).parent.name == "sft_train" and checkpoints.find(run_dir).name == "step_000005"
    assert checkpoints.find(run_dir, "base_train").name == "step_000020"
    assert checkpoints.find(run_dir, "base_train", 10).name == "step_000010"


def test_find_names_what_exists_when_nothing_matches(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(FileNotFoundError, match=r"available: \{'sft_train': \[5\], 'base_train': \[10, 20\]\}"):
        checkpoints.find(run_dir, "base_train", 999)
    with pytest.raises(FileNotFoundError, match="train a model first"):
        checkpoints.find(tmp_path)


def test_load_for_inference_restores_the_weights_in_eval_mode(run):
    import torch

    run_dir, original = run
    model, meta = checkpoint.load_for_inference(checkpoints.find(run_dir), "cpu")
    assert meta["step"] == 5 and not model.training
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(idx), original(idx))
