"""The inference engine: KV-cache decoding equals full recomputation, sampling, several samples, tools, stops."""

import bpe_rust
import pytest
import torch

from tests.helpers import REPO
from gpt.engine import Engine, KVCache, sample_next
from gpt.model import GPTConfig, build_model
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level tokenizer without merges (256 bytes + the 9 specials): one token per character."""
    trained = bpe_rust.Tokenizer.train(["6*7 is 42!"], 256 + len(SPECIAL_TOKENS), special_tokens=SPECIAL_TOKENS)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    trained.save_hf(str(path))
    return Tokenizer.from_file(path)


def tiny(tok, **kw) -> GPTConfig:
    base = dict(sequence_len=32, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return GPTConfig(**{**base, **kw})


def random_model(config: GPTConfig, seed=0):
    """Built like the trainer builds it, then the zero-initialised projections and head get real values."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def bigram_model(tok, transitions: dict[int, list[int]]):
    """A real GPT wired by hand so that after token a it predicts the tokens in transitions[a] (equally likely).

    Zero output projections make every block the identity, one-hot embeddings make the final state
    point at the current token, and the head maps that state to its successors' logits (near the
    soft-cap, so anything else has probability ~e^-15).
    """
    V = tok.vocab_size
    config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=4, n_kv_head=4, n_embd=272)
    torch.manual_seed(0)
    model = build_model(config, "cpu").eval()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.eye(V, config.n_embd))
        for a, successors in transitions.items():
            for b in successors:
                model.lm_head.weight[b, a] = 3.0
    return model


def prompt_of(tok, text="hi"):
    return tok.render_for_completion({"messages": [{"role": "user", "content": text}]})


# ---- the KV cache equals full recomputation ---------------------------------------------------------

@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("window_pattern", ["L", "SL"], ids=["full", "sliding"])
def test_cached_greedy_decoding_matches_full_recompute(tok, n_kv_head, window_pattern):
    config = tiny(tok, n_kv_head=n_kv_head, window_pattern=window_pattern)
    if window_pattern == "SL":
        assert config.window_sizes()[0] == 8  # shorter than prompt + generated: the window mask matters
    model = random_model(config)
    engine = Engine(model, tok)
    prompt = [tok.bos_id] + tok.encode("6*7 is")
    seq = list(prompt)
    for column in engine.generate(prompt, max_tokens=20, temperature=0.0):
        (token, mask), = column
        full = model(torch.tensor([seq]))[0, -1]
        torch.testing.assert_close(engine.last_logits[0], full, rtol=1e-4, atol=1e-4)
        assert token == full.argmax().item() and mask == 1
        seq.append(token)
    assert len(seq) == len(prompt) + 20  # no stop token on the way: every step was compared
    assert seq[len(prompt):] == model.generate(prompt, max_tokens=20)  # the model's own naive reference


def test_chunk_after_a_cached_prefix_matches_full_forward(tok):
    """Several tokens at a time at a nonzero position: causal and sliding-window masks over cached keys."""
    config = tiny(tok, window_pattern="SL")
    model = random_model(config)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = KVCache.for_model(model, batch=2, max_len=20)
    with torch.no_grad():
        parts = [model(ids[:, :7], kv_cache=cache), model(ids[:, 7:16], kv_cache=cache)]
        parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(16, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cache_holds_only_the_kv_heads(tok):
    config = tiny(tok, n_head=4, n_kv_head=1)
    model = random_model(config)
    cache = KVCache.for_model(model, batch=1, max_len=10)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    assert [tuple(k.shape) for k in cache.k] == [(1, 1, 10, 16)] * 2
    assert cache.pos == 3
    with pytest.raises(ValueError, match="KV cache full"):
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)


# ---- sampling -----------------------------------------------------------------------------------------

def test_same_seed_same_samples_different_seed_different(tok):
    engine = Engine(random_model(tiny(tok)), tok)
    prompt = prompt_of(tok)
    rng = torch.get_rng_state()
    a = engine.generate_batch(prompt, num_samples=2, max_tokens=15, temperature=1.0, seed=1)
    assert torch.equal(rng, torch.get_rng_state())  # a private generator: the global RNG is untouched
    assert a == engine.generate_batch(prompt, num_samples=2, max_tokens=15, temperature=1.0, seed=1)
    assert a != engine.generate_batch(prompt, num_samples=2, max_tokens=15, temperature=1.0, seed=2)


def test_samples_from_one_prefill_differ(tok):
    engine = Engine(random_model(tiny(tok)), tok)
    rows, masks = engine.generate_batch(prompt_of(tok), num_samples=4, max_tokens=10, temperature=1.0, seed=0)
    assert len({tuple(r) for r in rows}) == 4
    assert len({r[0] for r in rows}) > 1  # each row samples its own first token from the prompt's logits
    assert all(m == [1] * len(r) for r, m in zip(rows, masks))


def test_top_k_one_equals_greedy(tok):
    engine = Engine(random_model(tiny(tok)), tok)
    prompt = prompt_of(tok)
    greedy, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.5, top_k=1, seed=5)
    assert top1 == greedy * 3


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, g, 1.0, top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(sample_next(logits, g, 1.0, top_p=0.5).tolist()) == {0}
    assert set(sample_next(logits, g, 1.0, top_k=3).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, g, 1.0).tolist()) == {0, 1, 2, 3}
    assert sample_next(logits[:1], None, 0.0).tolist() == [0]


def test_bad_sampling_settings_are_refused_at_the_call(tok):
    engine = Engine(random_model(tiny(tok)), tok)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([tok.bos_id], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([tok.bos_id], top_p=0.0)
    with pytest.raises(ValueError, match="no room"):
        engine.generate([tok.bos_id] * 320)


# ---- tools and stops ------------------------------------------------------------------------------------

def tool_script(tok):
    """assistant_start -> python_start 6 * 7 python_end; output_end -> ! -> assistant_end."""
    s = tok.special
    six, times, seven = tok.encode("6*7")
    chain = [s("<|assistant_start|>"), s("<|python_start|>"), six, times, seven, s("<|python_end|>")]
    transitions = {a: [b] for a, b in zip(chain, chain[1:])}
    bang = tok.encode("!")[0]
    transitions[s("<|output_end|>")] = [bang]
    transitions[bang] = [s("<|assistant_end|>")]
    return transitions


def test_tool_output_is_forced_into_the_stream_with_mask_zero(tok):
    calls = []

    def fake_tool(expr):
        calls.append(expr)
        return "42"

    engine = Engine(bigram_model(tok, tool_script(tok)), tok, tool=fake_tool)
    columns = list(engine.generate(prompt_of(tok), max_tokens=30, temperature=0.0))
    stream = [column[0] for column in columns]
    s = tok.special
    expected = ([s("<|python_start|>"), *tok.encode("6*7"), s("<|python_end|>")]
                + [s("<|output_start|>"), *tok.encode("42"), s("<|output_end|>")]
                + [tok.encode("!")[0], s("<|assistant_end|>")])
    assert [t for t, _ in stream] == expected
    assert [m for _, m in stream] == [1] * 5 + [0] * 4 + [1] * 2
    assert calls == ["6*7"]
    rows, masks = engine.generate_batch(prompt_of(tok), max_tokens=30, temperature=0.0)
    assert rows == [expected[:-1]] and masks == [[1] * 5 + [0] * 4 + [1]]  # the stop token is left out


def test_tool_without_output_forces_nothing(tok):
    engine = Engine(bigram_model(tok, tool_script(tok)), tok, tool=lambda expr: None)
    (row,), (mask,) = engine.generate_batch(prompt_of(tok), max_tokens=8, temperature=0.0)
    s = tok.special
    assert row[:5] == [s("<|python_start|>"), *tok.encode("6*7"), s("<|python_end|>")]
    assert s("<|output_start|>") not in row and mask == [1] * len(row)


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_a_stop_token_ends_its_row_while_others_continue(tok, stop):
    a = tok.encode("a")[0]
    s = tok.special
    # After "a": "a" again or the stop token, half and half.
    model = bigram_model(tok, {s("<|assistant_start|>"): [a], a: [a, s(stop)]})
    engine = Engine(model, tok)
    columns = list(engine.generate(prompt_of(tok), num_samples=4, max_tokens=12, temperature=1.0, seed=0))
    ended_at = {}
    for step, column in enumerate(columns):
        for row, entry in enumerate(column):
            if row in ended_at:
                assert entry is None  # an ended row yields nothing more
            elif entry[0] == s(stop):
                ended_at[row] = step
    assert ended_at, "no row met the stop token"
    first = min(ended_at.values())
    assert any(entry is not None for column in columns[first + 1:] for entry in column)  # others went on
    assert len(columns) == 12 or len(ended_at) == 4  # runs until max_tokens or until every row ended


def test_next_token_probs_are_the_softmax_of_the_last_logits(tok):
    model = random_model(tiny(tok))
    engine = Engine(model, tok)
    tokens = [tok.bos_id] + tok.encode("6*7 is")
    top = engine.next_token_probs(tokens, k=5)
    probs = torch.softmax(model(torch.tensor([tokens]))[0, -1], dim=-1)
    assert [t for t, _ in top] == probs.topk(5).indices.tolist()
    assert [p for _, p in top] == pytest.approx(probs.topk(5).values.tolist(), rel=1e-5)


def test_bf16_autocast_generates_and_returns_fp32_logits(tok):
    engine = Engine(random_model(tiny(tok, window_pattern="SL")), tok, dtype=torch.bfloat16)
    rows, _ = engine.generate_batch(prompt_of(tok), num_samples=2, max_tokens=12, temperature=0.0)
    assert rows[0] == rows[1] and len(rows[0]) > 0
    assert engine.last_logits.dtype == torch.float32 and torch.isfinite(engine.last_logits).all()


@pytest.mark.slow  # ~15 s with a warm inductor cache, ~30 s cold, on 2 cores
def test_compiled_decode_step_matches_eager(tok, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
    torch._dynamo.reset()
    model = random_model(tiny(tok, window_pattern="SL"))
    prompt = [tok.bos_id] + tok.encode("6*7 is")
    eager = Engine(model, tok).generate_batch(prompt, max_tokens=16, temperature=0.0)
    from torch._dynamo.utils import counters

    counters.clear()  # they add up over the process: other tests compile too
    assert Engine(model, tok, compile=True).generate_batch(prompt, max_tokens=16, temperature=0.0) == eager
    # Dynamic shapes: one graph for the prefill and one for every decode position, no recompiles per step.
    assert counters["stats"]["unique_graphs"] == 2
