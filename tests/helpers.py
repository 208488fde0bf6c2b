"""Small helpers shared by tests (no fixtures here: see conftest.py)."""

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mirror() -> Path:
    """The offline data mirror: $NANOSTUDIO_DATA_MIRROR or ../shared/data beside the checkout."""
    value = os.environ.get("NANOSTUDIO_DATA_MIRROR")
    path = Path(value) if value else REPO.parent / "shared" / "data"
    if not (path / "pretrain").is_dir():
        pytest.fail(f"offline data mirror not found at {path}; set NANOSTUDIO_DATA_MIRROR to a folder laid out like shared/data")
    return path


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_test_checkpoints(run_dir, model, stages_and_steps) -> None:
    """Write `model` as finished checkpoints (weights + meta.json) of the given (stage, step) pairs."""
    import json

    from safetensors.torch import save_file

    from pipeline import checkpoints

    for stage, step in stages_and_steps:
        folder = checkpoints.stage_dir(run_dir, stage) / f"step_{step:06d}"
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"step": step, "model_config": model.config.to_dict()}))


def make_chat_run(run_dir, stages_and_steps, sequence_len: int = 64):
    """A run dir with a real tokenizer (vocab 1024, trained on the mirror) and a small random model
    (2 layers, GQA) saved as finished checkpoints of the given (stage, step) pairs. Returns run_dir."""
    import os

    import torch

    from trainer import tok_train
    from gpt.model import GPTConfig, build_model

    os.environ["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    assert tok_train.main(["--run-dir", str(run_dir), "--vocab-size", "1024", "--max-chars", "300000", "--doc-cap", "5000"]) == 0
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    save_test_checkpoints(run_dir, build_model(config, "cpu"), stages_and_steps)
    return run_dir


# Test oracles: the model's size written out by hand, independent of gpt/model.py and pipeline/plan.py.
def count_params_by_hand(config) -> int:
    """Closed form: untied embedding and head, and per layer q, k, v, proj and the 4x MLP (no biases, no norm weights)."""
    d, kv = config.n_embd, config.n_kv_head * config.head_dim
    per_layer = d * d + 2 * d * kv + d * d + 8 * d * d
    return 2 * config.vocab_size * d + config.n_layer * per_layer


def flops_per_token_by_hand(config) -> float:
    non_embedding = count_params_by_hand(config) - config.vocab_size * config.n_embd
    attn = sum(12 * config.n_head * config.head_dim * min(w, config.sequence_len) for w in config.window_sizes())
    return float(6 * non_embedding + attn)
