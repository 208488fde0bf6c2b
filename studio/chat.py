"""What the chat page can do to conversations: the one place their state changes.

Used by the chat consumer (studio/consumers.py, through database_sync_to_async) and the
chat views. Every function takes the acting user and only touches that user's
conversations; bad input raises ChatError with a message that says what to do.

    conv, created, question, answer = start_exchange(user, None, None, "Hi!", {"run": ..., "stage": "sft_train"})
    request = generation_request(answer)       # -> studio.serving.Request for the model pool
    save_answer(answer.id, parts=..., status="done", ...)

Checkpoints: any finished checkpoint of any run (chat is for comparing what was
trained), base_train ones in completion mode, mid/sft/rl ones in chat mode.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

import studio.live
from studio.models import Conversation, Message, Run
from studio.render import markdown_html
from pipeline import checkpoints, stages
from pipeline.checkpoints import complete_checkpoints

DEFAULT_SAMPLING = {"temperature": 0.6, "top_k": 50, "max_tokens": 256, "seed": None}
BOUNDS = {"temperature": (0.0, 2.0), "top_k": (0, 1000), "seed": (0, 2**31 - 1)}
TITLE_CHARS = 60


class ChatError(Exception):
    """Something the person can fix; `field` names the input it is about (or None)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_storable(text: str, field: str) -> str:
    """`text` if a database can store it: no lone surrogate (JSON can carry "\\ud800", UTF-8 cannot)
    and no NUL character (PostgreSQL refuses it in text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatError(f"{field} is not valid Unicode text (it holds a lone surrogate such as \\ud800); "
                        "send the text as typed", field) from None
    if "\x00" in text:
        raise ChatError(f"{field} contains a NUL character (\\u0000), which cannot be stored; remove it", field)
    return text


def limits() -> dict:
    lim = settings.NANOSTUDIO_CHAT_LIMITS
    return {
        "max_message_chars": lim["max_message_chars"],
        "max_turns": lim["max_turns"],
        "max_total_chars": lim["max_total_chars"],
        "temperature": list(BOUNDS["temperature"]),
        "top_k": list(BOUNDS["top_k"]),
        "max_tokens": [1, lim["max_new_tokens"]],
        "seed": list(BOUNDS["seed"]),
    }


def mode_of(stage: str) -> str:
    return Conversation.Mode.COMPLETION if stages.get(stage).chat_mode == "completion" else Conversation.Mode.CHAT


def list_checkpoints(runs=None) -> list[dict]:
    """Every finished checkpoint by run and stage: [{"run", "run_label", "stage", "mode", "steps"}], newest runs first."""
    runs = Run.objects.order_by("-created_at") if runs is None else runs
    found = []
    for run in runs:
        for stage in stages.model_stages():
            steps = [step for step in map(_step_of, complete_checkpoints(checkpoints.stage_dir(run.run_dir, stage))) if step is not None]
            if steps:
                found.append({"run": run.id, "run_label": run.name or run.id, "stage": stage,
                              "mode": mode_of(stage), "steps": sorted(steps)})
    return found


def _step_of(path) -> int | None:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return None


def clean_settings(data, current: dict | None = None) -> dict:
    """Checkpoint and sampling settings from the page, checked against the bounds; missing keys keep `current`."""
    if not isinstance(data, dict):
        raise ChatError("settings must be an object", "settings")
    out = dict(DEFAULT_SAMPLING, run=None, stage=None, step=None)
    out.update(current or {})
    for key in ("run", "stage"):
        if key in data:
            value = data[key]
            if value not in (None, "") and not isinstance(value, str):
                raise ChatError(f"{key} must be text", key)
            out[key] = value or None
    if out["stage"] is not None and out["stage"] not in stages.model_stages():
        raise ChatError(f"stage must be one of {', '.join(stages.model_stages())}", "stage")
    if "step" in data:
        out["step"] = _number(data["step"], "step", int, 0, 10**12, allow_none=True)
    if "temperature" in data:
        out["temperature"] = _number(data["temperature"], "temperature", float, *BOUNDS["temperature"])
    if "top_k" in data:
        out["top_k"] = _number(data["top_k"], "top_k", int, *BOUNDS["top_k"])
    if "max_tokens" in data:
        out["max_tokens"] = _number(data["max_tokens"], "max_tokens", int, 1, settings.NANOSTUDIO_CHAT_LIMITS["max_new_tokens"])
    if "seed" in data:
        out["seed"] = _number(data["seed"], "seed", int, *BOUNDS["seed"], allow_none=True)
    return out


def _number(value, field: str, kind, low, high, allow_none: bool = False):
    label = field.replace("_", " ")
    if value in (None, "") and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ChatError(f"{label} must be a number between {low} and {high}", field)
    try:
        number = kind(value) if kind is float else int(str(value).strip())
    except ValueError:
        kind_name = "a whole number" if kind is int else "a number"
        raise ChatError(f"{label} must be {kind_name} between {low} and {high}, not {value!r}", field) from None
    if kind is int and isinstance(value, float) and value != int(value):
        raise ChatError(f"{label} must be a whole number between {low} and {high}", field)
    if not (low <= number <= high) or number != number:  # the second catches NaN
        raise ChatError(f"{label} must be between {low} and {high}, not {value}", field)
    return number


def conversation_settings(conv: Conversation) -> dict:
    return dict(conv.sampling(), run=conv.run_id, stage=conv.stage or None, step=conv.step)


def default_settings(checkpoints: list[dict]) -> dict:
    first = checkpoints[0] if checkpoints else None
    return dict(DEFAULT_SAMPLING, run=first and first["run"], stage=first and first["stage"], step=None)


def step_param(value: str | None) -> int | None:
    """The ?step= of a chat link: None when absent, else a training step (ASCII digits: "²" and
    "٣" are digits to str.isdigit() but not to int(), and 5,000 digits are refused by int())."""
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 12):
        raise ChatError("step must be a whole number such as 500 (a checkpoint's training step); "
                        "showing the latest step instead", "step")
    return int(value)


def preselect(settings: dict, checkpoints: list[dict], run_id: str, stage: str | None, step: int | None) -> dict:
    """`settings` pointing at a run's checkpoint (its most advanced stage unless `stage` names one of
    its stages; `step` only when that stage has it); unchanged when the run has no such checkpoint."""
    candidates = [c for c in checkpoints if c["run"] == run_id and (not stage or c["stage"] == stage)]
    if not candidates:
        return settings
    chosen = candidates[0]
    return dict(settings, run=run_id, stage=chosen["stage"], step=step if step in chosen["steps"] else None)


def _apply_settings(conv: Conversation, values: dict) -> None:
    """Store checkpoint and sampling on the conversation; the checkpoint's kind must match the conversation's mode."""
    if values["run"] is not None:
        if not Run.objects.filter(pk=values["run"]).exists():
            raise ChatError(f"there is no run {values['run']!r}; pick a checkpoint from the list", "run")
        if values["stage"] is None:
            raise ChatError("pick a stage of that run", "stage")
        mode = mode_of(values["stage"])
        if conv.pk and conv.messages.exists() and mode != conv.mode:
            kinds = {"chat": "a chat (mid/sft/rl) checkpoint", "completion": "a base checkpoint"}
            raise ChatError(f"this conversation needs {kinds[conv.mode]}; start a new chat to use {kinds[mode]}", "stage")
        conv.mode = mode
    conv.run_id, conv.stage, conv.step = values["run"], values["stage"] or "", values["step"]
    conv.temperature, conv.top_k = values["temperature"], values["top_k"]
    conv.max_tokens, conv.seed = values["max_tokens"], values["seed"]


MAX_ID = 2**63 - 1  # ids are 64-bit (BigAutoField): a larger number names nothing, and databases refuse it


def _pk(value) -> int | None:
    try:
        pk = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return pk if 0 < pk <= MAX_ID and not isinstance(value, bool) else None


# Someone else's conversation and one that does not exist get the same answer: ids are sequential,
# and a different error would tell which ids are other people's.

def get_conversation(user, conversation_id) -> Conversation:
    """The person's conversation `conversation_id`, or ChatError; always filtered by owner."""
    pk = _pk(conversation_id)
    conv = Conversation.objects.select_related("run").filter(pk=pk, owner=user).first() if pk else None
    if conv is None:
        raise ChatError("no such conversation (it may have been deleted)", "conversation")
    return conv


def get_message(user, message_id) -> Message:
    """A message of one of the person's conversations, or ChatError; always filtered by owner."""
    pk = _pk(message_id)
    message = Message.objects.select_related("conversation").filter(pk=pk, conversation__owner=user).first() if pk else None
    if message is None:
        raise ChatError("no such message (it may have been deleted)", "message")
    return message


def save_settings(user, conversation_id, data) -> Conversation:
    conv = get_conversation(user, conversation_id)
    _apply_settings(conv, clean_settings(data, conversation_settings(conv)))
    conv.save()
    return conv


def _check_text(conv: Conversation, text, parent: Message | None) -> str:
    if not isinstance(text, str):
        raise ChatError("the message must be text", "text")
    lim = settings.NANOSTUDIO_CHAT_LIMITS
    if len(text) > lim["max_message_chars"]:
        raise ChatError(f"the message is {len(text):,} characters; the limit is {lim['max_message_chars']:,}. Shorten it.", "text")
    if not text.strip() and not (conv.mode == Conversation.Mode.COMPLETION and parent is not None):
        raise ChatError("type a message first", "text")
    branch = conv.branch(parent) if parent else []
    if sum(m.role == Message.Role.USER for m in branch) + 1 > lim["max_turns"]:
        raise ChatError(f"this conversation reached {lim['max_turns']} turns; start a new chat", "text")
    total = sum(len(m.content) for m in branch) + len(text)
    if total > lim["max_total_chars"]:
        raise ChatError(f"this conversation would reach {total:,} characters, over the limit of {lim['max_total_chars']:,}; "
                        "start a new chat", "text")
    return text


def _new_answer(conv: Conversation, question: Message) -> Message:
    answer = Message.objects.create(
        conversation=conv, parent=question, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING,
        checkpoint=conv.checkpoint_label, sampling=conv.sampling())
    conv.leaf = answer
    conv.updated_at = timezone.now()
    conv.save(update_fields=["leaf", "updated_at"])
    return answer


def _require_checkpoint(conv: Conversation):
    """The checkpoint folder the conversation's answers come from, or a ChatError saying what to pick."""
    if not conv.stage:
        raise ChatError("pick a checkpoint first (no model has been trained yet? start a run on the Runs page)", "run")
    if conv.run_id is None:
        raise ChatError("the run of this chat's checkpoint was deleted; pick another checkpoint", "run")
    try:
        return checkpoints.find(conv.run.run_dir, conv.stage, conv.step)
    except FileNotFoundError as e:
        raise ChatError(f"{e}; pick another checkpoint", "step") from None


@transaction.atomic
def start_exchange(user, conversation_id, parent_id, text, data) -> tuple[Conversation, bool, Message, Message]:
    """A user message under `parent_id` and an empty answer to stream into; a new conversation when id is None."""
    created = conversation_id in (None, "")
    if created:
        conv = Conversation(owner=user)
        _apply_settings(conv, clean_settings(data or {}))
    else:
        conv = get_conversation(user, conversation_id)
        if data:
            _apply_settings(conv, clean_settings(data, conversation_settings(conv)))
    _require_checkpoint(conv)
    parent = None
    if parent_id not in (None, ""):
        if created:
            raise ChatError("a new conversation has no message to answer under", "parent")
        parent = get_message(user, parent_id)
        if parent.conversation_id != conv.id:
            raise ChatError("that message belongs to another conversation", "parent")
    text = _check_text(conv, text, parent)
    if created:
        first_line = text.strip().splitlines()[0] if text.strip() else "Completion"
        conv.title = first_line[:TITLE_CHARS] + ("…" if len(first_line) > TITLE_CHARS else "")
    conv.save()
    question = Message.objects.create(conversation=conv, parent=parent, role=Message.Role.USER, content=text)
    return conv, created, question, _new_answer(conv, question)


@transaction.atomic
def start_edit(user, message_id, text) -> tuple[Conversation, Message, Message]:
    """A new version of a user message (a sibling under the same parent) and an answer to it."""
    original = get_message(user, message_id)
    if original.role != Message.Role.USER:
        raise ChatError("only your own messages can be edited; regenerate an answer instead", "message")
    conv = original.conversation
    _require_checkpoint(conv)
    text = _check_text(conv, text, original.parent)
    question = Message.objects.create(conversation=conv, parent=original.parent, role=Message.Role.USER, content=text)
    return conv, question, _new_answer(conv, question)


@transaction.atomic
def start_regenerate(user, message_id) -> tuple[Conversation, Message]:
    """A new version of an answer: a sibling under the same user message."""
    original = get_message(user, message_id)
    if original.role != Message.Role.ASSISTANT or original.parent is None:
        raise ChatError("only an answer can be regenerated", "message")
    conv = original.conversation
    _require_checkpoint(conv)
    return conv, _new_answer(conv, original.parent)


def prepare_continue(user, message_id, live: set[int]) -> tuple[Conversation, Message]:
    """An interrupted answer (or one left streaming by a server that stopped), to generate further."""
    answer = get_message(user, message_id)
    conv = answer.conversation
    if answer.role != Message.Role.ASSISTANT:
        raise ChatError("only an answer can be continued", "message")
    if answer.status not in (Message.Status.INTERRUPTED, Message.Status.STREAMING) or answer.id in live:
        raise ChatError("this answer is not waiting to be continued", "message")
    _require_checkpoint(conv)
    answer.status = Message.Status.STREAMING
    answer.save(update_fields=["status"])
    return conv, answer


def select_version(user, conversation_id, message_id) -> Conversation:
    """Show the branch through `message_id`, down to its newest descendant."""
    conv = get_conversation(user, conversation_id)
    message = get_message(user, message_id)
    if message.conversation_id != conv.id:
        raise ChatError("that message belongs to another conversation", "message")
    conv.leaf = conv.latest_leaf_under(message)
    conv.save(update_fields=["leaf"])
    return conv


def generation_request(answer: Message):
    """What the model pool needs to write (or continue) `answer`, with the checkpoint resolved to a folder."""
    from studio.serving import Request

    conv = answer.conversation
    path = _require_checkpoint(conv)
    branch = conv.branch(answer)[:-1]  # up to the question
    if conv.mode == Conversation.Mode.COMPLETION:
        messages = [{"text": document_text(branch)}]
    else:
        messages = [{"role": m.role, "content": m.content if m.role == Message.Role.USER else (m.parts or [{"type": "text", "text": ""}])}
                    for m in branch]
    sampling = answer.sampling or conv.sampling()
    return Request(key=str(path), completion=conv.mode == Conversation.Mode.COMPLETION, messages=messages,
                   prior_ids=list(answer.token_ids), temperature=sampling["temperature"], top_k=sampling["top_k"],
                   max_tokens=sampling["max_tokens"], seed=sampling["seed"])


def document_text(branch: list[Message]) -> str:
    """Completion mode: the document is every text of the branch in order, the model's included."""
    return "".join(m.content for m in branch)


def save_answer(message_id: int, parts: list[dict], token_ids: list[int], probs: list | None, status: str,
                finish: str = "", error: str = "", seconds: float | None = None) -> Message | None:
    """Store an answer's progress or its end (a kill mid-answer loses at most the last save interval).

    None when the answer is gone: its conversation was deleted while it was being written.
    """
    message = Message.objects.select_related("conversation").filter(pk=message_id).first()
    if message is None:
        return None
    message.parts = parts
    message.content = "".join(p["text"] for p in parts if p["type"] == "text") if message.conversation.mode == "chat" \
        else "".join(p["text"] for p in parts)
    message.token_ids = token_ids
    if probs is not None:
        message.probs = probs
    message.status, message.finish, message.error = status, finish, error
    if seconds is not None:
        message.seconds = (message.seconds or 0) + seconds
    message.save()
    return message


def mark_stale(conv: Conversation, live: set[int]) -> None:
    """Answers left 'streaming' by a server that stopped are interrupted: the page continues them."""
    conv.messages.filter(status=Message.Status.STREAMING).exclude(pk__in=live).update(status=Message.Status.INTERRUPTED)


def conversation_json(conv: Conversation) -> dict:
    return {"id": conv.id, "title": conv.title or f"Chat {conv.id}", "url": conv.get_absolute_url(), "mode": conv.mode,
            "settings": conversation_settings(conv), "checkpoint_label": conv.checkpoint_label}


def message_json(message: Message, mode: str) -> dict:
    parts = []
    for part in message.parts:
        item = {"type": part["type"], "text": part["text"]}
        if part["type"] == "text" and mode == "chat" and message.status != Message.Status.STREAMING:
            item["html"] = str(markdown_html(part["text"]))
        parts.append(item)
    return {"id": message.id, "parent": message.parent_id, "role": message.role, "content": message.content,
            "parts": parts, "status": message.status, "finish": message.finish, "error": message.error,
            "checkpoint": message.checkpoint, "sampling": message.sampling, "seconds": message.seconds,
            "tokens": len(message.token_ids), "probs": message.probs if mode == "completion" else []}


def open_payload(user, conversation_id, live: set[int]) -> dict:
    conv = get_conversation(user, conversation_id)
    mark_stale(conv, live)
    messages = list(conv.messages.all())
    generating = next((m.id for m in messages if m.id in live), None)
    return {"type": "conversation", "conversation": conversation_json(conv),
            "messages": [message_json(m, conv.mode) for m in messages], "leaf": conv.leaf_id, "generating": generating}


# daphne refuses to send a WebSocket frame over 1 MiB (the socket dies with 1011), and a completion
# conversation passes that soon: every token of every version carries its probabilities. What the
# chat socket sends is cut into frames of about studio.live.MESSAGE_BYTES by the run page's
# splitter, studio.live.chunked.

def split_message(payload: dict) -> tuple[dict, list[dict]]:
    """A message's JSON ready to send, and the "probs" frames that must follow it when its
    token probabilities make it too big for one frame (each says where its piece starts)."""
    if len(json.dumps(payload)) <= studio.live.MESSAGE_BYTES or not payload["probs"]:
        return payload, []
    frames, offset = [], 0
    for piece in studio.live.chunked(payload["probs"]):
        frames.append({"type": "probs", "message": payload["id"], "offset": offset, "probs": piece})
        offset += len(piece)
    return dict(payload, probs=[]), frames


def message_frames(kind: str, message: Message, mode: str) -> list[dict]:
    """A "message" or "done" frame for `message`, followed by its probabilities in pieces if needed."""
    head, tails = split_message(message_json(message, mode))
    return [{"type": kind, "message": head}] + tails


def open_frames(user, conversation_id, live: set[int]) -> list[dict]:
    """The "conversation" answer to "open" as frames that each fit a WebSocket message: the
    conversation with its first messages, "messages" frames with the rest ("more": true on every
    frame but the last of these), then "probs" frames for messages too big for one frame."""
    payload = open_payload(user, conversation_id, live)
    heads, tails = [], []
    for message in payload["messages"]:
        head, frames = split_message(message)
        heads.append(head)
        tails += frames
    chunks = list(studio.live.chunked(heads)) or [[]]
    conversation_id = payload["conversation"]["id"]
    frames = [dict(payload, messages=chunks[0])]
    frames += [{"type": "messages", "conversation": conversation_id, "messages": chunk} for chunk in chunks[1:]]
    for i, frame in enumerate(frames):
        frame["more"] = i < len(frames) - 1
    return frames + tails


SEARCH_MAX_CHARS = 200


def search_conversations(user, query) -> list[int]:
    """Ids of the person's conversations whose title or any message contains `query` (any case), newest first."""
    query = (query or "").strip() if isinstance(query, str) else ""
    if len(query) > SEARCH_MAX_CHARS:
        raise ChatError(f"search for at most {SEARCH_MAX_CHARS} characters", "q")
    check_storable(query, "q")
    conversations = Conversation.objects.filter(owner=user)
    if query:
        conversations = conversations.filter(
            Q(title__icontains=query) | Q(messages__content__icontains=query)).distinct()
    return list(conversations.values_list("id", flat=True))


def rename_conversation(user, conversation_id, title) -> Conversation:
    conv = get_conversation(user, conversation_id)
    title = (title or "").strip() if isinstance(title, str) else ""
    if not title:
        raise ChatError("a title cannot be empty", "title")
    if len(title) > 200:
        raise ChatError(f"a title has at most 200 characters, this one {len(title)}", "title")
    check_storable(title, "title")
    conv.title = title
    conv.save(update_fields=["title"])
    return conv


def delete_conversation(user, conversation_id) -> None:
    get_conversation(user, conversation_id).delete()
