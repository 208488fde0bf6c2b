"""Fast generation: a KV cache, sampling, several samples per prompt, and the calculator tool.

    from gpt.checkpoint import find, load_for_inference
    from gpt.engine import Engine
    from gpt.tokenizer import Tokenizer

    model, meta = load_for_inference(find("runs/<id>"), device="cuda")
    tok = Tokenizer.from_dir("runs/<id>")
    engine = Engine(model, tok, dtype=torch.bfloat16)          # bf16 autocast on CUDA

    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 6*7?"}]})
    for column in engine.generate(prompt, max_tokens=256, temperature=0.6, top_k=50, seed=None):
        token, mask = column[0]                                # one entry per sample; None once it ended
        ...                                                    # stream tok.decode(...) to the user

    rows, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=64, temperature=1.0)
    engine.next_token_probs(tok.encode("The capital of France is", prepend=tok.bos_id), k=5)

How a call runs:
1. The prompt is run once, batch 1, filling a cache preallocated for prompt + max_tokens positions
   (per layer, n_kv_head heads: grouped-query attention keeps the cache small).
2. For several samples the cache is copied to num_samples rows and the prompt's last logits to every
   row, so each row samples its own first token.
3. Then one token per step: sample every row, yield the column, feed it back (T=1) at the cache's
   position. Rotary angles start at that position; sliding-window layers only see their last
   `window` keys.

Tool use (per row): when a row samples <|python_start|>, the tokens up to <|python_end|> are decoded
and given to `tool` (default gpt.calculator.evaluate); when it returns a string, the row is made
to emit <|output_start|> + its tokens + <|output_end|> on the next steps (mask 0: forced, not sampled),
fed through the model like any token, so the cache stays consistent.

A row ends when it emits <|assistant_end|> or <|bos|> (yielded, then None for that row) or after
max_tokens steps (every row). All rows share one cache position, so ended rows keep riding along in
the batch until the last row ends; their outputs are ignored.

Prompt + max_tokens may exceed the training context (up to the rotary table, 10 x sequence_len;
max_tokens is clamped to fit). Past sequence_len every layer keeps attending to its last `window`
keys (sequence_len for full layers): a sliding context, where GPT.generate crops and recomputes.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


class KVCache:
    """Keys and values of every layer for `batch` rows and up to `max_len` positions.

    Per layer one (batch, n_kv_head, max_len, head_dim) tensor each for keys and values, allocated
    at the first insert in the dtype of the keys (bf16 under autocast, fp32 otherwise), never grown.
    `pos` is how many positions are filled, the same for every row. GPT.forward calls insert() in
    each layer, then advance() once.
    """

    def __init__(self, batch: int, n_layer: int, n_kv_head: int, head_dim: int, max_len: int):
        self.batch, self.n_kv_head, self.head_dim, self.max_len = batch, n_kv_head, head_dim, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        c = model.config
        return cls(batch, c.n_layer, c.n_kv_head, c.head_dim, max_len)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_head, T, head_dim) at positions pos..pos+T-1; return all keys and values so far."""
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} positions exceed its {self.max_len}")
        if self.k[layer] is None:
            shape = (self.batch, self.n_kv_head, self.max_len, self.head_dim)
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def repeat(self, n: int) -> "KVCache":
        """A copy with each row repeated n times (from a batch-1 prefill to n sample rows)."""
        out = KVCache(self.batch * n, len(self.k), self.n_kv_head, self.head_dim, self.max_len)
        out.k = [None if t is None else t.repeat_interleave(n, dim=0) for t in self.k]
        out.v = [None if t is None else t.repeat_interleave(n, dim=0) for t in self.v]
        out.pos = self.pos
        return out


def check_sampling(temperature: float, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token per row of logits (rows, vocab) -> (rows,) int64.

    temperature 0 is argmax. top_k keeps the k most likely tokens (None or 0: all), top_p the smallest
    set of most likely tokens whose probability reaches top_p (None or 1: all); both may be combined.
    """
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the more likely ones before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def default_tool(expr: str) -> str | None:
    """The calculator, imported on first use (no calculator module: no tool output)."""
    try:
        from gpt.calculator import evaluate
    except ImportError:
        return None
    return evaluate(expr)


class _Row:
    """Per-sample state: its tokens so far, whether it ended, an open python block, forced tokens waiting."""

    def __init__(self):
        self.tokens: list[int] = []
        self.done = False
        self.python: list[int] | None = None  # tokens of the open <|python_start|> block, if any
        self.forced: deque[int] = deque()


class Engine:
    def __init__(self, model, tokenizer, tool: Callable[[str], str | None] | None = default_tool,
                 dtype: torch.dtype | None = None, compile: bool = False):
        """`dtype` (e.g. torch.bfloat16) runs the model under autocast; None leaves precision to the caller.

        `tool` maps the text of a python block to its output (None: no output); pass None to disable tools.
        `compile` runs the prefill and the one-token decode steps through torch.compile (two graphs,
        dynamic shapes): ~20 s to compile, then ~2x faster decoding on the CPU (bench/inference.py).
        """
        self.model = model
        self.tokenizer = tokenizer
        self.tool = tool
        self.device = next(model.parameters()).device
        self.dtype = dtype
        self._freeze = False
        self._decode = self._compiled(model) if compile else model
        s = tokenizer.special
        self.stop_ids = {s(name) for name in STOP_TOKENS}
        self.python_start, self.python_end = s("<|python_start|>"), s("<|python_end|>")
        self.output_start, self.output_end = s("<|output_start|>"), s("<|output_end|>")
        self.last_logits: torch.Tensor | None = None  # (rows, vocab) fp32 behind the last yielded column

    def _compiled(self, model):
        """The model through torch.compile, for the prefill and the decode steps.

        On the CPU inductor also freezes the model (see _forward): the weights become constants
        that it pre-packs once for oneDNN (in bf16 under a bf16 autocast, for AMX) instead of
        casting and packing them again at every step. Measured on a 2-core AMX CPU, depth 4,
        batch 1 (bench/inference.py): eager fp32 ~100 tok/s, compiled and frozen fp32 ~200,
        compiled and frozen under bf16 autocast ~340. Frozen weights are copies taken at the first call: the
        model must not be trained afterwards (inference only).
        """
        import torch._inductor.config  # noqa: F401  (torch._inductor is not loaded by `import torch`)

        self._freeze = self.device.type == "cpu"
        return torch.compile(model, dynamic=True)

    def _autocast(self):
        if self.dtype is None or self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _forward(self, model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) of the last position of ids (rows, T), cached from cache.pos on."""
        # Inductor compiles at the first call (and at recompiles): freezing is read then. It only
        # applies to inference graphs, so a training compile in the same process is unaffected.
        freeze = torch._inductor.config.patch(freezing=True) if self._freeze and model is self._decode else nullcontext()
        with torch.no_grad(), self._autocast(), freeze:
            return model(ids, kv_cache=cache, last_only=True)[:, -1, :].float()

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 42) -> Iterator[list[tuple[int, int] | None]]:
        """Yield, per step, one entry per sample row: (token_id, mask) or None once that row has ended.

        mask is 1 for a sampled token and 0 for a forced one (tool output). The stop token that ends
        a row is yielded (so a stream sees why it ended); afterwards the row yields None. The
        generator returns when every row has ended or after max_tokens steps. seed None draws a
        fresh random seed; the sampler never touches torch's global RNG.
        """
        if not tokens:
            raise ValueError("generate needs at least one prompt token (e.g. the BOS token)")
        if num_samples < 1 or max_tokens < 0:
            raise ValueError(f"num_samples must be >= 1 and max_tokens >= 0, got {num_samples} and {max_tokens}")
        room = self.model.rotary_len - len(tokens)
        if room <= 0:
            raise ValueError(f"the prompt of {len(tokens)} tokens leaves no room in the model's {self.model.rotary_len} positions")
        check_sampling(temperature, top_p)
        # Checked above, run below: a generator function would not raise until its first step.
        return self._generate(tokens, num_samples, min(max_tokens, room), temperature, top_k, top_p, seed)

    def _generate(self, tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
        if max_tokens == 0:
            return
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()  # fresh, non-deterministic
        else:
            generator.manual_seed(seed)

        cache = KVCache.for_model(self.model, 1, len(tokens) + max_tokens)
        prompt = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logits = self._forward(self._decode, prompt, cache)
        if num_samples > 1:
            cache = cache.repeat(num_samples)
            logits = logits.expand(num_samples, -1)
        rows = [_Row() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next(logits, generator, temperature, top_k, top_p).tolist()
            self.last_logits = logits
            column = [None if row.done else self._advance_row(row, token) for row, token in zip(rows, sampled)]
            yield column
            if all(row.done for row in rows) or step == max_tokens - 1:
                return
            # Ended rows feed their last token again: harmless, their outputs are never read.
            feed = torch.tensor([[row.tokens[-1]] for row in rows], dtype=torch.long, device=self.device)
            logits = self._forward(self._decode, feed, cache)

    def _advance_row(self, row: _Row, sampled: int) -> tuple[int, int]:
        """Choose the row's next token (a forced one first), update its tool state, return (token, mask)."""
        token, mask = (row.forced.popleft(), 0) if row.forced else (sampled, 1)
        row.tokens.append(token)
        if token in self.stop_ids:
            row.done = True
        elif token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            expr, row.python = self.tokenizer.decode(row.python), None
            result = self.tool(expr) if self.tool is not None else None
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
        elif row.python is not None:
            row.python.append(token)
        return token, mask

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Run generate to the end: per row the new tokens (stop token excluded) and their masks."""
        results: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        for column in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, entry in enumerate(column):
                if entry is not None and entry[0] not in self.stop_ids:
                    results[i].append(entry[0])
                    masks[i].append(entry[1])
        return results, masks

    def next_token_probs(self, tokens: list[int], k: int = 10) -> list[tuple[int, float]]:
        """The k most likely next tokens after `tokens` and their probabilities, most likely first."""
        if not tokens:
            raise ValueError("next_token_probs needs at least one token (e.g. the BOS token)")
        # Like training, the model sees at most sequence_len tokens: longer texts keep their end.
        ids = torch.tensor([tokens[-self.model.config.sequence_len:]], dtype=torch.long, device=self.device)
        with torch.no_grad(), self._autocast():
            logits = self.model(ids, last_only=True)[0, -1].float()
        self.last_logits = logits[None]
        probs, order = torch.topk(F.softmax(logits, dim=-1), min(k, logits.size(-1)))
        return [(int(i), float(p)) for i, p in zip(order.tolist(), probs.tolist())]


class AnswerStream:
    """Turns generated token ids into message parts and the text deltas a page appends.

    Chat answers are split like the tokenizer's message parts: text, then a python block
    (<|python_start|> … <|python_end|>), then its python_output, then text again. Text is
    released only when it decodes to whole characters (a multi-byte character split over
    two tokens shows up once complete). Used by the terminal chat (trainer/chat_cli.py) and the
    studio's chat page (studio/serving.py); `completion` treats every token as text.
    """

    def __init__(self, tokenizer, completion: bool):
        self.tok = tokenizer
        self.completion = completion
        s = tokenizer.special_ids
        self.switch = {} if completion else {
            s["<|python_start|>"]: "python", s["<|python_end|>"]: "text",
            s["<|output_start|>"]: "python_output", s["<|output_end|>"]: "text",
        }
        self.specials = set(s.values())
        self.parts: list[dict] = []  # {"type", "text"}: what has been released so far
        self.open: dict | None = None  # the part the current ids belong to, once it has text
        self.ids: list[int] = []  # ids of the current part
        self.kind = "text"
        self.token_ids: list[int] = []
        self.deltas: list[list] = []  # [part index, type, appended text], since take_deltas

    def add(self, token: int) -> None:
        self.token_ids.append(token)
        if token in self.switch:
            self._release(final=True)
            self.open, self.ids, self.kind = None, [], self.switch[token]
            return
        if token in self.specials:
            return  # a control token with no place here: not text
        self.ids.append(token)
        self._release(final=False)

    def finish(self) -> list[dict]:
        self._release(final=True)
        return self.message_parts()

    def take_deltas(self) -> list[list]:
        deltas, self.deltas = self.deltas, []
        return deltas

    def _release(self, final: bool) -> None:
        """Append the current part's newly complete text (all of it when final)."""
        if not self.ids:
            return
        text = self.tok.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        if self.open is None:
            if not text:
                return
            self.open = {"type": self.kind, "text": ""}
            self.parts.append(self.open)
        new = text[len(self.open["text"]):]
        if new:
            self.open["text"] = text
            self.deltas.append([len(self.parts) - 1, self.open["type"], new])

    def message_parts(self) -> list[dict]:
        return [{"type": p["type"], "text": p["text"]} for p in self.parts]


def fit_history(tokenizer, messages: list[dict], budget: int) -> tuple[list[int], list[dict]]:
    """The prompt for the next answer, dropping the oldest exchanges until it fits `budget` tokens."""
    while True:
        prompt = tokenizer.render_for_completion({"messages": messages})
        if len(prompt) <= budget or len(messages) <= 1:
            return prompt[-budget:], messages
        messages = messages[2:]  # one user turn and its answer
