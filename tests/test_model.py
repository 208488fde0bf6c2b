"""The GPT: sizes, parameter and FLOP counts, attention variants, precision, compile, generation."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import REPO
from gpt.model import GPT, CausalSelfAttention, GPTConfig, apply_rotary, build_model, rotary_tables
from tests.helpers import count_params_by_hand, flops_per_token_by_hand


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(**kw) -> GPTConfig:
    base = dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return GPTConfig(**{**base, **kw})


def make(config: GPTConfig, seed=0) -> GPT:
    torch.manual_seed(seed)
    return build_model(config, "cpu")


def tokens(config, batch=2, T=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, T or config.sequence_len), generator=g)


def randomize_outputs(model, seed=2):
    """Give the zero-initialised projections and head real values, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,width,heads", [(4, 256, 2), (20, 1280, 10), (25, 1664, 13), (26, 1664, 13), (32, 2048, 16)])
def test_from_depth_rounds_the_width_up_to_whole_heads(depth, width, heads):
    c = GPTConfig.from_depth(depth, 65536)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (depth, width, heads, heads, 128)
    assert GPTConfig.from_dict(c.to_dict()) == c


def test_from_depth_options_and_bad_values():
    c = GPTConfig.from_depth(2, 512, sequence_len=64, aspect_ratio=32, head_dim=64)  # the base_train test model
    assert (c.n_embd, c.n_head, c.sequence_len) == (64, 1, 64)
    assert GPTConfig.from_depth(20, 100, n_kv_head=5, window_pattern="SSSL").n_kv_head == 5
    with pytest.raises(ValueError, match="depth must be at least 1"):
        GPTConfig.from_depth(0, 100)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig.from_depth(4, 0)
    with pytest.raises(ValueError, match=r"pick one of \[1, 2, 5, 10\]"):
        GPTConfig.from_depth(20, 100, n_kv_head=3)
    with pytest.raises(ValueError, match="not a multiple of n_head"):
        GPTConfig(n_embd=100, n_head=3, n_kv_head=3)
    with pytest.raises(ValueError, match="S and L"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="unknown model config keys"):
        GPTConfig.from_dict({**tiny().to_dict(), "dropout": 0.1})


def test_window_sizes():
    c = GPTConfig.from_depth(6, 100, window_pattern="SSSL")
    assert c.short_window() == 512
    assert c.window_sizes() == [512, 512, 512, 2048, 512, 2048]  # tiled, and the last layer is always full
    assert GPTConfig(sequence_len=1000).short_window() == 256  # 250 rounded up to a multiple of 128
    assert GPTConfig(sequence_len=64).short_window() == 16  # short contexts keep a real window
    assert GPTConfig(n_layer=3, window_pattern="S").window_sizes() == [512, 512, 2048]


# ---- parameter and FLOP counts ----------------------------------------------------------------------

@pytest.mark.parametrize("depth,expected", [(20, 560_988_160), (26, 1_081_999_360), (32, 1_879_048_192), (34, 2_217_082_880)])
def test_parameter_counts_match_the_reference_and_the_formula(depth, expected):
    config = GPTConfig.from_depth(depth, 65536)
    with torch.device("meta"):  # no memory: a depth-32 model is "built" instantly
        model = GPT(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == count_params_by_hand(config) == expected
    assert model.num_scaling_params() == expected - 65536 * config.n_embd


def test_build_model_on_meta_then_a_real_device():
    model = make(tiny())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert model.num_params() == count_params_by_hand(tiny())  # GQA: k and v are narrower
    assert not any(k.endswith(("cos", "sin")) for k in model.state_dict())  # rotary tables are not saved
    assert torch.equal(model.cos, rotary_tables(model.rotary_len, 16, 10000.0)[0])


@pytest.mark.parametrize("depth,expected", [(20, 3.4918e9), (32, 1.2080e10), (34, 1.4265e10)])
def test_flops_per_token_match_the_reference(depth, expected):
    config = GPTConfig.from_depth(depth, 65536)
    with torch.device("meta"):
        model = GPT(config)
    assert model.flops_per_token() == flops_per_token_by_hand(config)
    assert float(f"{model.flops_per_token():.4e}") == expected


def test_flops_formula_with_sliding_windows():
    c = GPTConfig(sequence_len=2048, vocab_size=1000, n_layer=4, n_head=2, n_kv_head=1, n_embd=256, window_pattern="SSSL")
    linear = 4 * (256 * 256 * 2 + 2 * 256 * 128 + 8 * 256 * 256) + 1000 * 256
    attn = 12 * 2 * 128 * (512 * 3 + 2048)
    assert flops_per_token_by_hand(c) == 6 * linear + attn
    with torch.device("meta"):
        assert GPT(c).flops_per_token() == 6 * linear + attn


def test_flops_per_token_agree_with_torch_flop_counter():
    config = tiny(sequence_len=16)
    model = make(config)
    B, T = 2, config.sequence_len
    x = tokens(config, B, T)
    with FlopCounterMode(display=False) as fwd:
        model(x)
    # The counter sees the forward exactly: 2 x (Linear weights) per token plus 4 x H x D x T for QK^T and AV.
    assert 3 * fwd.get_total_flops() == model.flops_per_token() * B * T
    with FlopCounterMode(display=False) as both:
        model(x, x).backward()
    counts = {str(op): n for op, n in both.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in counts.items() if "attention" not in op)
    embedding = config.vocab_size * config.n_embd
    assert matmuls == 6 * (model.num_params() - embedding) * B * T


# ---- forward ------------------------------------------------------------------------------------

def test_shapes_initial_loss_and_reductions():
    config = tiny()
    model = make(config)
    x = tokens(config, 3)
    logits = model(x)
    assert logits.shape == (3, 32, 96) and logits.dtype == torch.float32
    assert torch.count_nonzero(logits) == 0  # zero head: uniform first prediction
    assert model(x, x).item() == pytest.approx(math.log(96), abs=1e-5)
    randomize_outputs(model)
    per_token = model(x, x, loss_reduction="none")
    assert per_token.shape == (3 * 32,)
    assert model(x, x).item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    y = x.clone()
    y[:, :10] = -1  # ignored positions (padding, masked prompts)
    kept = model(x, y, loss_reduction="none").view(3, 32)
    assert torch.all(kept[:, :10] == 0)
    assert model(x, y).item() == pytest.approx(kept[:, 10:].mean().item(), rel=1e-6)


def test_logits_respect_the_soft_cap():
    model = make(tiny())
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)
    logits = model(tokens(tiny()))
    assert logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.0  # saturated, not clipped by something else
    model.config.softcap = 30.0
    assert model(tokens(tiny())).abs().max() > 15.0


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa_config, mha_config = tiny(n_head=4, n_kv_head=2), tiny(n_head=4, n_kv_head=4)
    gqa = make(gqa_config)
    randomize_outputs(gqa)
    mha = make(mha_config)
    state = {}
    for name, t in gqa.state_dict().items():
        if name.endswith(("c_k.weight", "c_v.weight")):
            # query heads 2h and 2h+1 share kv head h
            t = t.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
        state[name] = t
    mha.load_state_dict(state)
    x = tokens(gqa_config)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
    gqa(x, x).backward()
    assert all(p.grad is not None for p in gqa.parameters())


def test_sliding_window_sees_exactly_window_keys():
    config = tiny()
    attn = CausalSelfAttention(config, window=4)
    torch.manual_seed(0)
    for lin in (attn.c_q, attn.c_k, attn.c_v, attn.c_proj):
        torch.nn.init.normal_(lin.weight, std=0.2)
    cos, sin = rotary_tables(32, config.head_dim, 10000.0)
    x = torch.randn(1, 32, 64)
    x2 = x.clone()
    x2[0, 5] += 1.0  # change one position: only queries 5..8 (window 4, itself included) may notice
    changed = (attn(x, cos, sin) - attn(x2, cos, sin)).abs().amax(dim=-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [5, 6, 7, 8]


def test_sliding_window_model_equals_full_attention_when_the_window_covers_the_input():
    short, full = tiny(sequence_len=64, window_pattern="S"), tiny(sequence_len=64, window_pattern="L")
    assert short.window_sizes() == [16, 64]
    a, b = make(short), make(full)
    randomize_outputs(a)
    b.load_state_dict(a.state_dict())
    x = tokens(short, T=16)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    x = tokens(short, T=64)
    assert (a(x) - b(x)).abs().max() > 1e-3


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(64, 16, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rotary(q.view(1, 1, 1, 16).expand(1, 64, 1, 16), cos, sin)[0, m, 0]
        kn = apply_rotary(k.view(1, 1, 1, 16).expand(1, 64, 1, 16), cos, sin)[0, n, 0]
        return (qm @ kn).item()

    assert score(10, 3) == pytest.approx(score(40, 33), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_sequences_longer_than_the_rotary_table_are_refused():
    config = tiny(sequence_len=8)
    model = make(config)
    model(tokens(config, T=80))  # 10 x sequence_len is fine
    with pytest.raises(ValueError, match="rotary"):
        model(tokens(config, T=81))


# ---- precision, compile ------------------------------------------------------------------------------

def test_bf16_autocast_forward_and_backward_match_fp32():
    config = tiny()
    model = make(config)
    randomize_outputs(model)
    x = tokens(config)
    ref = model(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model(x, x)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.slow  # 5-20 s with a warm inductor cache, ~50 s cold, on 2 cores
def test_compiled_forward_and_backward_match_eager(monkeypatch):
    # A kept cache makes warm runs take seconds instead of a cold C++ build.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
    torch._dynamo.reset()
    config = tiny(window_pattern="SL")
    eager, compiled_src = make(config), make(config)
    randomize_outputs(eager)
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src, dynamic=False)
    x = tokens(config)
    a, b = eager(x, x), compiled(x, x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a.backward()
    b.backward()
    for p, q in zip(eager.parameters(), compiled_src.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5)


# ---- generation -------------------------------------------------------------------------------------

def test_generate_returns_only_new_tokens_and_is_reproducible():
    config = tiny()
    model = make(config)
    randomize_outputs(model)
    prompt = [1, 2, 3]
    greedy = model.generate(prompt, max_tokens=5)
    assert len(greedy) == 5 and all(isinstance(t, int) for t in greedy)
    assert greedy == model.generate(prompt, max_tokens=5)
    # greedy equals the argmax of a full forward at each step
    seq = list(prompt)
    for t in greedy:
        assert model(torch.tensor([seq]))[0, -1].argmax().item() == t
        seq.append(t)
    rng = torch.get_rng_state()
    sampled = model.generate(prompt, max_tokens=40, temperature=1.0, top_k=3, seed=7)
    assert torch.equal(rng, torch.get_rng_state())  # a private generator: training's RNG is untouched
    assert sampled == model.generate(prompt, max_tokens=40, temperature=1.0, top_k=3, seed=7)
    assert sampled != model.generate(prompt, max_tokens=40, temperature=1.0, top_k=3, seed=8)
    top3 = set(model(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist())
    assert sampled[0] in top3
    # prompts longer than the context are cropped to the last sequence_len tokens
    assert len(model.generate(list(range(40)), max_tokens=2)) == 2
