"""What the pages may send over the studio's WebSockets, checked in one place before any handler runs.

Each message type has a small schema: its fields and what each must be. `parse()` turns one
frame into (type, fields) with every field checked and converted, or raises ProtocolError
naming the field and the fix. The consumers (studio/consumers.py) then work with clean values
only: an id is an int the database can hold, a text is a str that can be stored, settings are
an object of plain values (their bounds are checked by studio.chat.clean_settings).

    kind, fields = parse(text_data, bytes_data, CHAT_MESSAGES, max_chars=...)
    # ("continue", {"message": 12})

A frame that is not one JSON object (binary, too big, not JSON, nested too deep to parse)
is a broken client: ProtocolError with close=True, and the socket closes with 4400. A JSON
object with an unknown type or a bad field gets an error naming the field and the socket
keeps serving.
"""

from __future__ import annotations

import json
from typing import Callable

from studio import chat
from studio.chat import ChatError

MAX_SEQ = 2**63 - 1


class ProtocolError(ChatError):
    """A message the server cannot take; `close`: the frame was not a JSON object at all (close 4400)."""

    def __init__(self, message: str, field: str | None = None, close: bool = False):
        super().__init__(message, field)
        self.close = close


Check = Callable[[object, str], object]  # (value, field name) -> the clean value, or ProtocolError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_str(value: str, field: str) -> str:
    try:
        chat.check_storable(value, field)
    except ChatError as e:
        raise ProtocolError(str(e), field) from None
    return value


def id_of(what: str, optional: bool = False) -> Check:
    """An id: a whole number from 1 to 2**63-1 (null allowed when `optional`)."""

    def check(value, field):
        if value is None and optional:
            return None
        if not _is_int(value) or not 1 <= value <= chat.MAX_ID:
            null = " or null" if optional else ""
            raise ProtocolError(f"{field} must be the id of {what} (a whole number){null}", field)
        return value

    return check


def text(value, field):
    if not isinstance(value, str):
        raise ProtocolError(f"{field} must be text (a JSON string)", field)
    return _check_str(value, field)


def settings_object(optional: bool = False) -> Check:
    """Chat settings: an object whose values are null, numbers or text (studio.chat.clean_settings checks
    the bounds); its keys name the field in errors, as the page's settings panel expects."""

    def check(value, field):
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise ProtocolError(f"{field} must be an object such as {{\"temperature\": 0.6}}", field)
        for key, item in value.items():
            _check_str(key, field)
            if isinstance(item, (dict, list)):
                raise ProtocolError(f"{key} must be a number or text, not a list or an object", key)
            if isinstance(item, str):
                _check_str(item, key)
        return value

    return check


def sequence(value, field):
    if value is not None and (not _is_int(value) or not 0 <= value <= MAX_SEQ):
        raise ProtocolError(f"{field} must be null or a sequence number >= 0", field)
    return value


CHAT_MESSAGES: dict[str, dict[str, Check]] = {
    "open": {"conversation": id_of("a conversation")},
    "send": {"conversation": id_of("a conversation", optional=True), "parent": id_of("a message", optional=True),
             "text": text, "settings": settings_object(optional=True)},
    "edit": {"message": id_of("a message"), "text": text},
    "regenerate": {"message": id_of("an answer")},
    "continue": {"message": id_of("an answer")},
    "stop": {},
    "select": {"conversation": id_of("a conversation"), "message": id_of("a message")},
    "settings": {"conversation": id_of("a conversation"), "settings": settings_object()},
    "ping": {},
    "pong": {},
}

RUN_MESSAGES: dict[str, dict[str, Check]] = {
    "hello": {"after": sequence},
    "ping": {},
    "pong": {},
}


def _int_or_float(digits: str):
    # Python refuses to parse integers of more than 4,300 digits (a ValueError for the whole frame):
    # a long number becomes a float (inf) here, so the schema refuses the one field that holds it.
    return int(digits) if len(digits) <= 40 else float(digits)


def parse(text_data: str | None, bytes_data: bytes | None, schemas: dict[str, dict[str, Check]],
          max_chars: int) -> tuple[str, dict]:
    """(type, checked fields) of one frame; missing fields are None. Raises ProtocolError."""
    if bytes_data is not None or text_data is None:
        raise ProtocolError("send JSON text frames, not binary ones", None, close=True)
    if len(text_data) > max_chars:
        raise ProtocolError(f"a message has at most {max_chars:,} characters", None, close=True)
    try:
        content = json.loads(text_data, parse_int=_int_or_float)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ProtocolError("messages must be JSON objects", None, close=True) from None
    if not isinstance(content, dict):
        raise ProtocolError("messages must be JSON objects with a type", None, close=True)
    kind = content.get("type")
    if not isinstance(kind, str) or kind not in schemas:
        raise ProtocolError(f"type must be one of {', '.join(schemas)}", "type")
    return kind, {name: check(content.get(name), name) for name, check in schemas[kind].items()}
