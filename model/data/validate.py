"""One input line -> a validated Record, or `Rejected` with the reason kind and what is wrong."""

from __future__ import annotations

import json

from pydantic import ValidationError

from model.config import DataConfig
from model.data.quarantine import Rejected
from model.data.records import Record


def _schema_kind(err: ValidationError) -> str:
    text = str(err)
    for needle, kind in (("tag(s) in the text but", "tag/media mismatch"), ("unknown media tag", "unknown media tag"),
                         ("non-empty assistant turn", "no answer")):
        if needle in text:
            return kind
    return "invalid record"


def parse_record(raw: bytes, data: DataConfig) -> Record:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise Rejected("not UTF-8", f"invalid byte 0x{raw[err.start]:02x} at byte {err.start} of the line") from None
    except json.JSONDecodeError as err:
        raise Rejected("malformed JSON", f"{err.msg} at column {err.colno}") from None
    except RecursionError:  # e.g. "[[[[..." thousands deep: the parser gives up, the line is not a record
        raise Rejected("malformed JSON", "nested too deeply to parse") from None
    if not isinstance(obj, dict):
        raise Rejected("invalid record", f"expected a JSON object, got {type(obj).__name__}")
    _check_strings(obj)
    try:
        record = Record.model_validate(obj)
    except ValidationError as err:
        detail = "; ".join(("{}: ".format(".".join(map(str, e["loc"]))) if e["loc"] else "")
                           + e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise Rejected(_schema_kind(err), detail) from None
    chars = sum(len(m.content) for m in record.messages)
    if chars > data.max_text_chars:
        raise Rejected("text too long", f"{chars} characters, over data.max_text_chars={data.max_text_chars}")
    return record


def _check_strings(obj: dict) -> None:
    """Every string of the line, keys and values in any field, is clean text: a lone surrogate
    (`"\\ud800"` escaped in the JSON) cannot be written as UTF-8, and a NUL ends the string for C
    tools and file systems. Walked with a stack: the parser accepts nesting deeper than a recursive
    walk may go."""
    stack: list[tuple[str, object]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"{where or 'record'}: key {key!r}")
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}", item) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise Rejected("not UTF-8", f"{where}: unpaired surrogate {bad!r} at character {err.start}") from None
    if "\x00" in text:
        raise Rejected("NUL character", f"{where}: NUL (\\u0000) at character {text.index(chr(0))}")


def maybe_id(raw: bytes) -> str | None:
    """The id of a line rejected before it became a Record, if it has one. Never raises: it runs
    inside the error handlers (a line nested too deep for the parser fails here as it did there)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(rid, str):
        return None
    try:
        _check_text(rid, "id")
    except Rejected:  # an id that is not clean text cannot name the line: the quarantine line says null
        return None
    return rid
