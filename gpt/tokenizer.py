"""The run-time tokenizer and the chat format.

Training happens in Rust (`bpe_rust`, see trainer/tok_train.py); encoding at
run time uses HuggingFace `tokenizers` loaded from the tokenizer.json our
trainer exported, because it is fast, multi-threaded and well kept.

    tok = Tokenizer.from_dir("runs/<id>/tokenizer")
    ids = tok.encode("hello", prepend=tok.bos_id)
    ids, mask = tok.render_conversation({"messages": [...]})

Conversations are {"messages": [{"role": ..., "content": ...}, ...]} (a bare
list of messages is accepted too). Roles alternate user/assistant, starting
with user; an optional leading system message is merged into the first user
turn. Assistant content is a string or a list of parts:
    {"type": "text", "text": ...}
    {"type": "python", "text": <code the assistant writes for the tool>}
    {"type": "python_output", "text": <what the tool returned>}
The mask is 1 on tokens the assistant must learn to produce (its text, its
tool calls and the closing <|assistant_end|>), 0 elsewhere, including tool
output, which the engine inserts at inference time.
"""

from __future__ import annotations

import json
import os
from functools import cache, cached_property
from pathlib import Path

import bpe_rust

# The nine document/chat/tool tokens, defined once in the Rust trainer.
SPECIAL_TOKENS = list(bpe_rust.SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message says which message and why."""


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: every byte value gets a printable character.

    Printable Latin-1 bytes stand for themselves; the rest (control
    characters, space, a few others) are shifted to code points from 256 on,
    in byte order. This is the convention byte-level BPE files use so that
    vocabularies are valid, whitespace-free JSON strings.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    def __init__(self, hf_tokenizer, path: Path | None = None):
        self._tok = hf_tokenizer
        # Plain text must never turn into control tokens: a user typing
        # "<|bos|>" gets the characters, not the token.
        self._tok.encode_special_tokens = True
        self.path = path
        self.special_ids = {}
        for s in SPECIAL_TOKENS:
            i = self._tok.token_to_id(s)
            if i is None:
                raise ValueError(f"{path or 'tokenizer'} lacks the special token {s}; retrain it with trainer.tok_train")
            self.special_ids[s] = i
        self.bos_id = self.special_ids["<|bos|>"]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; run the tok_train stage first (python -m trainer.tok_train --run-dir ...)")
        return cls(HFTokenizer.from_file(str(path)), path)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load from a tokenizer folder or from a run directory that has one."""
        folder = Path(folder)
        if (folder / "tokenizer" / TOKENIZER_FILE).exists():
            folder = folder / "tokenizer"
        return cls.from_file(folder / TOKENIZER_FILE)

    # -- basics -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(self.special_ids)}") from None

    def encode(self, text: str, prepend: int | None = None, append: int | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}; use batch_encode for lists")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if prepend is not None:
            ids.insert(0, prepend)
        if append is not None:
            ids.append(append)
        return ids

    def batch_encode(self, texts: list[str], prepend: int | None = None, append: int | None = None) -> list[list[int]]:
        """Encode many texts on all cores (tokenizers' own thread pool)."""
        out = [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)] \
            if hasattr(self._tok, "encode_batch_fast") else \
            [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        if prepend is not None or append is not None:
            pre = [prepend] if prepend is not None else []
            post = [append] if append is not None else []
            out = [pre + ids + post for ids in out]
        return out

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @cached_property
    def token_bytes(self) -> list[int]:
        """Byte length of every token (0 for special tokens), for bits-per-byte.

        Computed from the raw bytes each vocabulary entry stands for, not by
        decoding to str: a token holding half of a UTF-8 character still
        counts its real bytes.
        """
        back = unicode_to_bytes()
        vocab = self._tok.get_vocab(with_added_tokens=False)
        lengths = [0] * self.vocab_size
        for token, i in vocab.items():
            # Each character of a byte-level token stands for exactly one byte.
            if not all(c in back for c in token):
                raise ValueError(f"token {i} ({token!r}) is not byte-level; was this tokenizer made by trainer.tok_train?")
            lengths[i] = len(token)
        for i in self.special_ids.values():
            lengths[i] = 0
        return lengths

    def token_raw_bytes(self, i: int) -> bytes:
        back = unicode_to_bytes()
        token = self._tok.id_to_token(i)
        if token is None:
            raise IndexError(i)
        if i in self.special_ids.values():
            return token.encode()
        return bytes(back[c] for c in token)

    # -- chat format --------------------------------------------------------

    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and the training mask of one conversation (truncated to max_tokens)."""
        messages = _normalise(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens, m):
            if isinstance(tokens, int):
                tokens = [tokens]
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        s = self.special_ids
        add(self.bos_id, 0)
        for i, msg in enumerate(messages):
            if msg["role"] == "user":
                add(s["<|user_start|>"], 0)
                add(self.encode(msg["content"]), 0)
                add(s["<|user_end|>"], 0)
            else:
                add(s["<|assistant_start|>"], 0)
                content = msg["content"]
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                for part in parts:
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add(s["<|python_start|>"], 1)
                        add(self.encode(text), 1)
                        add(s["<|python_end|>"], 1)
                    else:  # python_output: produced by the tool, not learned
                        add(s["<|output_start|>"], 0)
                        add(self.encode(text), 0)
                        add(s["<|output_end|>"], 0)
                add(s["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt ids for the model to write the next assistant turn.

        A trailing assistant message (e.g. the answer in an eval example) is
        dropped; the prompt ends with <|assistant_start|>.
        """
        messages = _normalise(conversation, allow_trailing_user=True)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ConversationError("nothing to complete: the conversation has no user message")
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=1 << 30)
        return ids + [self.special_ids["<|assistant_start|>"]]


_PART_TYPES = ("text", "python", "python_output")


def _normalise(conversation, allow_trailing_user: bool = True) -> list[dict]:
    """Validate a conversation and merge a leading system message into the first user turn."""
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ConversationError("conversation dict needs a 'messages' list")
        messages = conversation["messages"]
    else:
        messages = conversation
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError("a conversation needs a non-empty list of messages")
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i} must be a dict with 'role' and 'content'")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("a system message must be followed by a user message")
        if not isinstance(messages[0]["content"], str) or not isinstance(messages[1]["content"], str):
            raise ConversationError("system and user content must be strings")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + messages[2:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] == "system":
            raise ConversationError(f"message {i}: a system message is only allowed first")
        if m["role"] not in ("user", "assistant"):
            raise ConversationError(f"message {i}: unknown role {m['role']!r}; use user, assistant (or a leading system)")
        if m["role"] != expected:
            raise ConversationError(f"message {i}: roles must alternate user/assistant starting with user; got {m['role']} where {expected} was expected")
        content = m["content"]
        if m["role"] == "user":
            if not isinstance(content, str):
                raise ConversationError(f"message {i}: user content must be a string")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES:
                    got = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ConversationError(f"message {i} part {j}: unknown part type {got!r}; use one of {', '.join(_PART_TYPES)}")
                if not isinstance(part.get("text"), str):
                    raise ConversationError(f"message {i} part {j}: 'text' must be a string")
        elif not isinstance(content, str):
            raise ConversationError(f"message {i}: assistant content must be a string or a list of parts")
    if not allow_trailing_user and messages[-1]["role"] != "assistant":
        raise ConversationError("the conversation must end with an assistant message")
    return messages


def load_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}
