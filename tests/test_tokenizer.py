"""The run-time tokenizer and the chat format, on a tokenizer trained by our own stage."""

import json

import pytest

from tests.helpers import mirror
from trainer import tok_eval, tok_train
from pipeline.events import read_events
from gpt.tokenizer import SPECIAL_TOKENS, ConversationError, Tokenizer


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A run whose tokenizer was trained by the real tok_train stage on the mirror."""
    import os

    os.environ["NANOSTUDIO_DATA_MIRROR"] = str(mirror())
    run = tmp_path_factory.mktemp("run")
    code = tok_train.main(["--run-dir", str(run), "--vocab-size", "1024", "--max-chars", "2000000", "--doc-cap", "5000"])
    assert code == 0
    return run


@pytest.fixture(scope="session")
def tok(run_dir):
    return Tokenizer.from_dir(run_dir)


def test_stage_writes_tokenizer_files_and_events(run_dir):
    names = {p.name for p in (run_dir / "tokenizer").iterdir()}
    assert {"tokenizer.json", "tokenizer.tiktoken", "meta.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    meta = json.loads((run_dir / "tokenizer" / "meta.json").read_text())
    assert meta["vocab_size"] == 1024 and meta["merges"] == 1024 - 256 - 9
    assert meta["chars_seen"] == 2_000_000 and meta["data_origin"] == "mirror"
    events, _ = read_events(run_dir)
    kinds = [e["kind"] for e in events if e["stage"] == "tok_train"]
    assert kinds[0] == "stage_start" and kinds[-1] == "stage_end" and "metric" in kinds and "result" in kinds
    assert events[-1]["status"] == "done"


def test_special_tokens_are_the_last_ids(tok):
    assert tok.vocab_size == 1024
    assert [tok.special(s) for s in SPECIAL_TOKENS] == list(range(1024 - 9, 1024))
    assert tok.bos_id == 1024 - 9
    with pytest.raises(KeyError, match="known"):
        tok.special("<|nope|>")


def test_encode_decode_and_batch(tok):
    text = "The quick brown fox — 日本語 🎉\n\tindented  "
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.batch_encode([text, "x"]) == [ids, tok.encode("x")]
    assert tok.encode("hi", prepend=tok.bos_id, append=tok.special("<|assistant_end|>"))[0] == tok.bos_id
    with pytest.raises(TypeError):
        tok.encode(["a list"])


def test_plain_text_never_becomes_a_special_token(tok):
    ids = tok.encode("<|bos|> <|user_start|>hello<|assistant_end|>")
    assert not set(ids) & set(tok.special_ids.values())


def test_token_bytes_come_from_raw_bytes(tok):
    tb = tok.token_bytes
    assert len(tb) == tok.vocab_size
    assert all(tb[i] == 1 for i in range(256))
    assert all(tb[i] == 0 for i in tok.special_ids.values())
    for i in range(256, tok.vocab_size - 9):
        assert tb[i] == len(tok.token_raw_bytes(i)) >= 2
    text = "naïve café ✓"
    assert sum(tb[i] for i in tok.encode(text)) == len(text.encode())


def ids_of(tok, *names):
    return [tok.special(n) for n in names]


def test_render_conversation_masks_only_what_the_assistant_writes(tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask)
    s = tok.special
    assert ids[0] == tok.bos_id and mask[0] == 0
    # the system message is merged into the first user turn
    first_user = ids[2:ids.index(s("<|user_end|>"))]
    assert tok.decode(first_user) == "Be brief.\n\n2+2?"
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == (
        "Let me compute.<|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>You're welcome.<|assistant_end|>"
    )
    out_start = ids.index(s("<|output_start|>"))
    out_end = ids.index(s("<|output_end|>"))
    assert set(mask[out_start:out_end + 1]) == {0}
    assert mask[ids.index(s("<|assistant_start|>"))] == 0
    assert ids.count(s("<|user_start|>")) == 2


def test_render_truncates(tok):
    conv = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 200}]
    ids, mask = tok.render_conversation(conv, max_tokens=50)
    assert len(ids) == len(mask) == 50


def test_render_for_completion_drops_the_answer_and_opens_the_assistant_turn(tok):
    conv = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    ids = tok.render_for_completion(conv)
    assert ids[-1] == tok.special("<|assistant_start|>")
    assert "Paris" not in tok.decode(ids)
    assert tok.render_for_completion(conv[:1]) == ids


@pytest.mark.parametrize("conv, words", [
    ([], "non-empty"),
    ({"msgs": []}, "'messages'"),
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "unknown role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "unknown part type"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "'text' must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}], "only allowed first"),
    ([{"role": "user", "content": 5}], "must be a string"),
    (["hello"], "must be a dict"),
])
def test_invalid_conversations_raise_clear_errors(tok, conv, words):
    with pytest.raises(ConversationError, match=words):
        tok.render_conversation(conv)


def test_missing_tokenizer_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="tok_train"):
        Tokenizer.from_dir(tmp_path)


def test_tok_eval_reports_every_domain_against_hf(run_dir, capsys):
    assert tok_eval.main(["--run-dir", str(run_dir), "--ref-vocab-dir", str(run_dir / "none")]) == 0
    result = json.loads((run_dir / "tokenizer" / "eval.json").read_text())
    domains = [r["domain"] for r in result["rows"]]
    assert domains == ["web", "code", "math", "non-english", "train-shard", "val-shard"]
    assert result["encoders"] == ["ours", "hf"]
    for row in result["rows"]:
        assert row["ours_bytes_per_token"] > 1.0 and row["hf_bytes_per_token"] > 1.0
    web = result["rows"][0]
    # Same data, same vocabulary: the two trainers should compress about equally.
    assert abs(web["vs_hf_pct"]) < 5
    assert any("gpt2 vocabulary not available" in n for n in result["notes"])
    events, _ = read_events(run_dir)
    assert any(e["kind"] == "eval" and e["name"] == "tokenizer" for e in events)
    assert "| web |" in capsys.readouterr().out


def test_tok_train_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tok_train.main(["--run-dir", str(tmp_path), "--vocab-size", "100"])
    assert "at least 266" in capsys.readouterr().err


def test_tok_eval_uses_reference_vocabularies_found_locally(run_dir, tmp_path):
    # Stand-in file with the tiktoken format (the real r50k/cl100k files need the internet).
    (tmp_path / "r50k_base.tiktoken").write_bytes((run_dir / "tokenizer" / "tokenizer.tiktoken").read_bytes())
    assert tok_eval.main(["--run-dir", str(run_dir), "--ref-vocab-dir", str(tmp_path), "--no-hf-baseline"]) == 0
    result = json.loads((run_dir / "tokenizer" / "eval.json").read_text())
    assert result["encoders"] == ["ours", "gpt2"]
    assert all(r["gpt2_tokens"] > 0 for r in result["rows"])


def test_python_and_rust_agree_on_the_special_tokens():
    import bpe_rust

    assert list(bpe_rust.SPECIAL_TOKENS) == SPECIAL_TOKENS
