"""Serving chat answers: a bounded pool of loaded models and the generation threads that use them.

    pool = get_pool()                                           # one per event loop (daphne has one)
    slot = await pool.acquire(user_id, key, on_position=...)    # waits fairly while every slot is busy
    thread = start_generation(pool, slot, request, stop, emit)  # tokens come back through emit()
    ...                                                         # the slot goes back to the pool when it ends

Slots: one per GPU of the node (NANOSTUDIO_CHAT_DEVICE=cuda, or auto with CUDA; pick them with
NANOSTUDIO_CHAT_GPUS=6,7 to keep chat off the GPUs training uses), else NANOSTUDIO_CHAT_SLOTS
on the CPU (default 1). A slot runs one generation at a time and
keeps up to NANOSTUDIO_CHAT_MODELS checkpoints loaded, least recently used evicted first,
so switching between two checkpoints does not reload each time.

Fairness: when every slot is busy, requests wait in a queue served round-robin by user
(the user served least recently goes first, then first come first served), so one person
with many tabs cannot starve the others. Each waiting request is told how many are ahead.

Generation runs in a thread (PyTorch releases the GIL, daphne's event loop stays free) and
checks a threading.Event before every token: a Stop, or a page that goes away, ends it
within one decode step, and the slot is released as soon as the thread returns.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import asyncio

from django.conf import settings

log = logging.getLogger(__name__)

TOP_K_PROBS = 5  # alternatives shown per token in completion mode


@dataclass
class Loaded:
    """A checkpoint in memory: the engine, its tokenizer, and what the model is."""
    key: str
    engine: object
    tokenizer: object
    sequence_len: int


class Slot:
    """One place a generation can run (a GPU, or a CPU share) and the models loaded there."""

    def __init__(self, index: int, device: str, capacity: int):
        self.index, self.device, self.capacity = index, device, capacity
        self.models: OrderedDict[str, Loaded] = OrderedDict()
        self.busy = False
        self.lock = threading.Lock()  # models is touched by generation threads

    def has(self, key: str) -> bool:
        with self.lock:
            return key in self.models

    def get(self, key: str, load: Callable[[str, str], Loaded]) -> Loaded:
        """The loaded checkpoint `key`, loading it (and evicting the least recently used) if needed."""
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
        loaded = load(key, self.device)  # outside the lock: seconds for a large model
        with self.lock:
            self.models[key] = loaded
            self.models.move_to_end(key)
            while len(self.models) > self.capacity:
                evicted, _ = self.models.popitem(last=False)
                log.info("chat slot %d: unloaded %s", self.index, evicted)
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.empty_cache()
        return loaded


@dataclass(eq=False)
class _Ticket:
    user: int
    key: str
    future: asyncio.Future
    order: int
    on_position: Callable[[int], None] | None = None
    position: int = -1


@dataclass
class Pool:
    slots: list[Slot]
    waiting: list[_Ticket] = field(default_factory=list)
    last_served: dict[int, int] = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=itertools.count)

    async def acquire(self, user: int, key: str, on_position: Callable[[int], None] | None = None) -> Slot:
        """A free slot for `user`'s request for checkpoint `key`; waits its fair turn when all are busy.

        Cancelling the waiting task (a Stop, a closed page) takes the request out of the queue.
        """
        loop = asyncio.get_running_loop()
        ticket = _Ticket(user, key, loop.create_future(), next(self._counter), on_position)
        self.waiting.append(ticket)
        self._dispatch()
        try:
            return await ticket.future
        except asyncio.CancelledError:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
                self._dispatch()
            elif ticket.future.done() and not ticket.future.cancelled():
                self.release(ticket.future.result())  # granted just as we were cancelled
            raise

    def release(self, slot: Slot) -> None:
        slot.busy = False
        self._dispatch()

    def queue_length(self) -> int:
        return len(self.waiting)

    def _dispatch(self) -> None:
        """Give free slots to waiting requests, fairest first, then tell the rest where they stand."""
        self.waiting.sort(key=lambda t: (self.last_served.get(t.user, -1), t.order))
        while self.waiting:
            free = [s for s in self.slots if not s.busy]
            if not free:
                break
            ticket = self.waiting.pop(0)
            if ticket.future.done():  # cancelled while queued
                continue
            # A slot that has the checkpoint loaded saves a load.
            slot = next((s for s in free if s.has(ticket.key)), free[0])
            slot.busy = True
            self.last_served[ticket.user] = next(self._counter)
            ticket.future.set_result(slot)
            self.waiting.sort(key=lambda t: (self.last_served.get(t.user, -1), t.order))
        for position, ticket in enumerate(self.waiting):
            if ticket.position != position and ticket.on_position is not None:
                ticket.position = position
                ticket.on_position(position)  # requests ahead of this one in the queue


def slot_devices() -> list[str]:
    """Where chat generations run: the chat's GPUs (NANOSTUDIO_CHAT_GPUS, default every GPU), or CPU slots."""
    wanted = settings.NANOSTUDIO_CHAT_DEVICE
    if wanted in ("auto", "cuda"):
        import torch
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            chosen = settings.NANOSTUDIO_CHAT_GPUS or list(range(count))
            missing = [i for i in chosen if not 0 <= i < count]
            if missing:
                raise RuntimeError(f"NANOSTUDIO_CHAT_GPUS names GPU {missing}, but this node has GPUs 0..{count - 1}")
            return [f"cuda:{i}" for i in chosen]
        if wanted == "cuda":
            raise RuntimeError("NANOSTUDIO_CHAT_DEVICE=cuda but PyTorch sees no GPU; use cpu or auto")
    return ["cpu"] * settings.NANOSTUDIO_CHAT_SLOTS


_pools: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool]" = weakref.WeakKeyDictionary()


def get_pool() -> Pool:
    """The pool of the running event loop (daphne runs one; each test gets a fresh one)."""
    loop = asyncio.get_running_loop()
    if loop not in _pools:
        _pools[loop] = Pool([Slot(i, d, settings.NANOSTUDIO_CHAT_MODELS) for i, d in enumerate(slot_devices())])
    return _pools[loop]


def load_checkpoint(key: str, device: str) -> Loaded:
    """Load the checkpoint folder `key` (…/checkpoints/<stage>/step_N) and its run's tokenizer."""
    from pathlib import Path

    import torch

    from gpt.checkpoint import load_for_inference
    from gpt.common import cpu_supports_bf16
    from gpt.engine import Engine
    from gpt.tokenizer import Tokenizer

    path = Path(key)
    run_dir = path.parent.parent.parent  # <run>/checkpoints/<stage>/step_N
    tokenizer = Tokenizer.from_dir(run_dir / "tokenizer")
    model, _meta = load_for_inference(path, device)
    compile = settings.NANOSTUDIO_CHAT_COMPILE
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    else:  # bf16 pays on the CPU only compiled (weights packed once) and with bf16 instructions
        dtype = torch.bfloat16 if compile and cpu_supports_bf16() else None
    engine = Engine(model, tokenizer, dtype=dtype, compile=compile)
    return Loaded(key, engine, tokenizer, model.config.sequence_len)


def token_probs(tokenizer, logits, token: int) -> dict:
    """{"t", "p", "top"}: the chosen token, its probability and the most likely alternatives (temperature 1)."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = torch.topk(probs, min(TOP_K_PROBS, probs.numel()))
    return {
        "t": tokenizer.decode([token]),
        "p": round(float(probs[token]), 5),
        "top": [[tokenizer.decode([i]), round(p, 5)] for i, p in zip(top_i.tolist(), top_p.tolist())],
    }


@dataclass
class Request:
    """What a generation needs, gathered from the database by studio.chat.generation_request."""
    key: str  # checkpoint folder
    completion: bool
    messages: list[dict]  # chat: the conversation for the prompt; completion: [{"text": document so far}]
    prior_ids: list[int]  # tokens of the answer written before an interruption
    temperature: float
    top_k: int
    max_tokens: int
    seed: int | None


def build_prompt(loaded: Loaded, request: Request) -> list[int]:
    """The prompt ids: the conversation (oldest exchanges dropped to fit) or the document's end, plus prior ids."""
    from gpt.engine import fit_history

    tok = loaded.tokenizer
    context = loaded.sequence_len
    # Keep room to answer inside the trained context; never less than half of it for the prompt.
    budget = max(context // 2, context - request.max_tokens) - len(request.prior_ids)
    budget = max(budget, 1)
    if request.completion:
        ids = tok.encode(request.messages[0]["text"])
        return [tok.bos_id] + ids[-(budget - 1):] + request.prior_ids if budget > 1 else [tok.bos_id] + request.prior_ids
    prompt, _ = fit_history(tok, request.messages, budget)
    return prompt + request.prior_ids


def run_generation(slot: Slot, request: Request, stop: threading.Event, emit: Callable[[tuple], None]) -> None:
    """Generate one answer on `slot` (in a thread), reporting through emit():

    ("loading",) when the checkpoint must be read first, ("started",), then per token
    ("token", id, deltas, probs-or-None), and finally ("end", finish, parts, token_ids, seconds)
    with finish "stop" | "length" | "stopped", or ("error", text).
    """
    from gpt.engine import AnswerStream

    try:
        if not slot.has(request.key):
            emit(("loading",))
        loaded = slot.get(request.key, load_checkpoint)
        stream = AnswerStream(loaded.tokenizer, request.completion)
        for token in request.prior_ids:
            stream.add(token)
        stream.take_deltas()  # the page already has them
        if stop.is_set():  # stopped while the checkpoint was loading
            emit(("end", "stopped", stream.finish(), stream.token_ids, 0.0))
            return
        prompt = build_prompt(loaded, request)
        max_tokens = request.max_tokens - len(request.prior_ids)
        engine = loaded.engine
        emit(("started",))
        started = time.monotonic()
        finish = "length"
        steps = engine.generate(prompt, max_tokens=max(max_tokens, 0), temperature=request.temperature,
                                top_k=request.top_k or None, seed=request.seed)
        try:
            for column in steps:
                if stop.is_set():
                    finish = "stopped"
                    break
                entry = column[0]
                if entry is None:
                    finish = "stop"
                    break
                token = entry[0]
                if token in engine.stop_ids:
                    finish = "stop"
                    break
                probs = token_probs(loaded.tokenizer, engine.last_logits[0], token) if request.completion else None
                stream.add(token)
                emit(("token", token, stream.take_deltas(), probs))
        finally:
            steps.close()
        stream.finish()
        emit(("token", None, stream.take_deltas(), None))
        emit(("end", finish, stream.message_parts(), stream.token_ids, time.monotonic() - started))
    except Exception as e:  # shown to the person; the server keeps going
        log.exception("chat generation failed")
        emit(("error", f"generation failed: {type(e).__name__}: {e}"))


def start_generation(pool: Pool, slot: Slot, request: Request, stop: threading.Event,
                     emit: Callable[[tuple], None]) -> threading.Thread:
    """Run the generation in a daemon thread; the slot goes back to the pool when it returns."""
    loop = asyncio.get_running_loop()

    def target():
        try:
            run_generation(slot, request, stop, emit)
        finally:
            try:
                loop.call_soon_threadsafe(pool.release, slot)
            except RuntimeError:  # the event loop is gone (the server is shutting down): nobody waits
                pass

    thread = threading.Thread(target=target, name=f"chat-slot-{slot.index}", daemon=True)
    thread.start()
    return thread
