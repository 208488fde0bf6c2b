"""The GPT: a decoder-only Transformer sized by one `depth` knob.

    config = GPTConfig.from_depth(20, vocab_size=65536)   # 1280 wide, 10 heads, 560,988,160 params
    model = build_model(config, "cuda")                  # built on meta, materialised, initialised
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx, targets)

Choices, and why (they follow what worked for the reference at this scale):
- rotary position embeddings (no learned positions), so context length is
  not baked into a parameter;
- RMSNorm without learnable parameters, right after the token embedding,
  before every sub-block (pre-norm), before the head, and on q and k
  (QK-norm keeps attention logits bounded without a temperature);
- no biases anywhere; untied input embedding and output head;
- ReLU² MLP (cheap, sparse, better than GELU here);
- grouped-query attention (n_kv_head < n_head shrinks the KV cache);
- optional sliding-window layers (window_pattern, e.g. "SSSL");
- a tanh soft-cap on the logits, computed in fp32, against runaway logits;
- zero-initialised output projections and head: every block starts as the
  identity and the first loss is exactly ln(vocab).

Parameters are fp32 "master" weights. Mixed precision is the caller's
`torch.autocast`; the numerically touchy parts (norms, rotary, soft-cap,
loss) run in fp32 either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import plan


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    window_pattern: str = "L"  # per-layer attention window, tiled over the layers; L full context, S short
    softcap: float = 15.0
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"the head dimension {self.head_dim} must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r} must be a non-empty string of S and L, e.g. 'SSSL'")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int = 2048, aspect_ratio: int = plan.ASPECT_RATIO,
                   head_dim: int = plan.HEAD_DIM, n_kv_head: int | None = None,
                   window_pattern: str = plan.WINDOW_PATTERN) -> "GPTConfig":
        """The model family: width = depth x aspect_ratio, rounded up to whole heads of `head_dim` (pipeline.plan)."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {vocab_size}; train or load a tokenizer first")
        width, n_head, n_kv_head = plan.width_and_heads(depth, aspect_ratio, head_dim, n_kv_head)
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_kv_head,
                   n_embd=width, window_pattern=window_pattern)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; was this written by a newer version?")
        return cls(**d)

    def short_window(self) -> int:
        """Keys an S layer sees: a quarter of the context, rounded up to a multiple of 128 (512 at 2048).

        For contexts up to 512 the quarter is used as is, so short test models still have a real window.
        """
        return plan.short_window(self.sequence_len)

    def window_sizes(self) -> list[int]:
        """Per layer, how many keys (the query's own position included) each query may attend to."""
        return plan.window_sizes(self.window_pattern, self.n_layer, self.sequence_len)


def norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free RMSNorm, always in fp32 (under autocast the residual stream is fp32 anyway).
    return F.rms_norm(x.float(), (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (1, seq_len, 1, head_dim/2), fp32, for (B, T, H, D) tensors."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate each (first half, second half) pair of channels by a position-dependent angle, in fp32.
    x = x.float()
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


_mask_cache: dict[tuple, torch.Tensor] = {}


def window_mask(T: int, window: int, device) -> torch.Tensor:
    """(T, T) bool: query i sees key j when 0 <= i - j < window. Cached per (T, window, device)."""
    if torch.compiler.is_compiling():  # inside a compiled graph build it inline: inductor fuses it
        i = torch.arange(T, device=device)
        d = i[:, None] - i[None, :]
        return (d >= 0) & (d < window)
    key = (T, window, str(device))
    mask = _mask_cache.get(key)
    if mask is None:
        i = torch.arange(T, device=device)
        d = i[:, None] - i[None, :]
        mask = _mask_cache[key] = (d >= 0) & (d < window)
    return mask


def cached_window_mask(pos: int, T: int, start: int, window: int, device) -> torch.Tensor:
    """(T, pos+T-start) bool for T queries at positions pos.. over cached keys at positions start..pos+T-1."""
    d = torch.arange(pos, pos + T, device=device)[:, None] - torch.arange(start, pos + T, device=device)[None, :]
    return (d >= 0) & (d < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, window: int, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = window
        self.layer_idx = layer_idx  # which slot of a KV cache is ours
        d, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv, bias=False)
        self.c_v = nn.Linear(d, kv, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # RoPE then QK-norm, both in fp32; back to v's dtype (bf16 under autocast) for attention.
        q, k = norm(apply_rotary(q, cos, sin)).to(v.dtype), norm(apply_rotary(k, cos, sin)).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None and kv_cache.pos > 0:
            return self.c_proj(self._attend_cached(q, k, v, kv_cache).transpose(1, 2).reshape(B, T, C))
        if kv_cache is not None:  # a prefill: remember k and v, then attend exactly as in training
            kv_cache.insert(self.layer_idx, k, v)
        if self.window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # Correct first: an explicit mask (SDPA then cannot use its fastest kernel).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, self.window, x.device), enable_gqa=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend_cached(self, q, k, v, kv_cache) -> torch.Tensor:
        """Queries at positions pos..pos+T-1 over every cached key they may see (inference only)."""
        pos, T = kv_cache.pos, q.size(2)
        keys, values = kv_cache.insert(self.layer_idx, k, v)  # positions 0..pos+T-1
        # Keys older than the window of the first query are invisible to all: drop them rather than mask them.
        start = max(0, pos - self.window + 1)
        keys, values = keys[:, :, start:], values[:, :, start:]
        # One query sees every key left (pos+1-start <= window of them); a chunk needs causality and the window.
        mask = None if T == 1 else cached_window_mask(pos, T, start, self.window, q.device)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, window: int, layer_idx: int = 0):
        super().__init__()
        self.attn = CausalSelfAttention(config, window, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """Cheap: no initialisation here, so the model can be built on the meta device (see build_model)."""
        super().__init__()
        self.config = config
        # `_weight=` skips nn.Embedding's own normal_() init, which on the meta device pulls in
        # torch's Python decompositions (~5 s of imports); init_weights() initialises it anyway.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)),
            h=nn.ModuleList([Block(config, w, i) for i, w in enumerate(config.window_sizes())]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables for 10x the training context (generation may run longer). Not parameters,
        # not in the state dict (persistent=False): init_weights fills them. (Computing them here
        # on the meta device would import torch's Python decompositions: seconds, for nothing.)
        self.rotary_len = 10 * config.sequence_len
        shape = (1, self.rotary_len, 1, config.head_dim // 2)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """The real initialisation (after `to_empty`); deterministic given torch's seed."""
        c = self.config
        self.cos, self.sin = rotary_tables(self.rotary_len, c.head_dim, c.rope_base, device=self.lm_head.weight.device)
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                # 1/sqrt(fan_in), shrunk for layers that narrow (arXiv 2310.17813, spectral scaling).
                fan_out, fan_in = lin.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                torch.nn.init.normal_(lin.weight, mean=0.0, std=std)
            # Zero output projections: each block starts as the identity on the residual stream.
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        torch.nn.init.zeros_(self.lm_head.weight)  # uniform first prediction: loss starts at ln(vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache=None, last_only: bool = False):
        """idx (B, T) int64 -> logits (B, T, vocab) fp32, or the loss when targets (B, T) are given.

        Targets of -1 are ignored. loss_reduction "mean" gives a scalar, "none" the (B*T,) per-token losses.

        With `kv_cache` (inference; see gpt/engine.py KVCache) idx holds the tokens at positions
        kv_cache.pos.. of every row: rotary angles start there, each layer stores its keys and values
        with kv_cache.insert(layer, k, v) -> all keys and values so far, and the cache advances by T.

        last_only gives the logits of the last position only, (B, 1, vocab): what generation needs.
        The head over a whole prompt (vocab x width per position) is most of a prefill's time.
        """
        B, T = idx.shape
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + T > self.rotary_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the rotary table ({self.rotary_len} = 10 x sequence_len)")
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(norm(x)).float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Transformer matrices + lm_head: the embedding lookup is left out (Kaplan-style, for tokens/param horizons)."""
        return self.num_params() - self.transformer.wte.weight.numel()

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward).

        6 x (weights of every Linear, lm_head included) for the matmuls, plus per layer
        12 x n_head x head_dim x (keys seen) for QK^T and AV. The embedding is a lookup: free.
        Causal masking is not discounted (as the reference and the usual MFU convention do).
        """
        c = self.config
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = sum(12 * c.n_head * c.head_dim * min(w, c.sequence_len) for w in c.window_sizes())
        return float(6 * linear + attn)

    @torch.no_grad()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 42) -> list[int]:
        """Continue `tokens` by `max_tokens` tokens and return only the new ones.

        Naive (the whole context is re-run every step, no KV cache): for sample completions during
        training. temperature 0 is greedy; otherwise sampled with a private generator, so it never
        disturbs the training RNG. The context is cropped to the last sequence_len tokens.
        """
        if not tokens:
            raise ValueError("generate needs at least one prompt token (e.g. the BOS token)")
        device = self.lm_head.weight.device
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        out = []
        for _ in range(max_tokens):
            logits = self(ids[:, -self.config.sequence_len:])[:, -1, :]
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
            out.append(int(nxt.item()))
        return out


def build_model(config: GPTConfig, device) -> GPT:
    """Construct on the meta device (no memory, instant even for depth 32), materialise on `device`, initialise.

    Every rank of a distributed run must call this with the same torch seed: there is no DDP
    wrapper to broadcast weights, so identical seeds are what make the replicas identical.
    """
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
