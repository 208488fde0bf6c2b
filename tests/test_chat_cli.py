"""The terminal chat (trainer.chat_cli) and finding checkpoints to chat with."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, make_chat_run
from pipeline import checkpoints
from gpt import engine
from trainer import chat_cli
from gpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A run dir with a real tokenizer and a small random model saved as a base and an sft checkpoint."""
    return make_chat_run(tmp_path_factory.mktemp("chat"), [("base_train", 10), ("base_train", 20), ("sft_train", 5)])


def test_find_prefers_the_most_advanced_stage_and_its_latest_step(chat_run):
    assert checkpoints.find(chat_run).parent.name == "sft_train"
    assert checkpoints.find(chat_run, "base_train").name == "step_000020"
    assert checkpoints.find(chat_run, "base_train", 10).name == "step_000010"


def test_find_names_what_exists_when_nothing_matches(chat_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"available: \{'sft_train': \[5\], 'base_train': \[10, 20\]\}"):
        checkpoints.find(chat_run, "base_train", 999)
    with pytest.raises(FileNotFoundError, match="train a model first"):
        checkpoints.find(tmp_path)


def test_printer_never_splits_a_multibyte_character(chat_run):
    tok = Tokenizer.from_dir(chat_run / "tokenizer")
    by_bytes = {}
    for i in range(tok.vocab_size):
        try:
            by_bytes.setdefault(tok.token_raw_bytes(i), i)
        except IndexError:
            pass
    out = io.StringIO()
    printer = chat_cli.Printer(tok, out)
    printer.add(by_bytes[b"a"])
    printer.add(by_bytes[b"\xc3"])  # the first half of "é"
    assert out.getvalue() == "a"
    printer.add(by_bytes[b"\xa9"])
    assert out.getvalue() == "aé"
    assert printer.finish() == "aé"


def test_history_is_cut_from_the_oldest_exchange(chat_run):
    tok = Tokenizer.from_dir(chat_run / "tokenizer")
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"question number {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last"})
    prompt, kept = engine.fit_history(tok, messages, budget=60)
    assert len(prompt) <= 60 and kept[-1]["content"] == "last" and len(kept) < len(messages)
    assert kept[0]["role"] == "user" and tok.decode(prompt).endswith("last<|user_end|><|assistant_start|>")


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "trainer.chat_cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_one_shot_prompt_streams_an_answer_and_exits(chat_run):
    result = run_cli("--run-dir", str(chat_run), "-p", "Hello there", "--max-tokens", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "sft_train step 5" in result.stderr and "chat mode" in result.stderr
    assert result.stdout.endswith("\n")


def test_interactive_session_clears_and_quits(chat_run):
    result = run_cli("--run-dir", str(chat_run), "--stage", "base_train", "--max-tokens", "5",
                     stdin="Once upon a time\nclear\nquit\n")
    assert result.returncode == 0, result.stderr
    assert "completion" in result.stderr and "(history cleared)" in result.stderr
    assert "text> Once upon a time" in result.stdout  # the text, then its continuation


def test_bad_flags_and_missing_checkpoints_are_explained(chat_run, tmp_path):
    assert "need --temperature >= 0" in run_cli("--run-dir", str(chat_run), "--temperature", "-1").stderr
    missing = run_cli("--run-dir", str(tmp_path))
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
