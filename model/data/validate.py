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
    try:
        record = Record.model_validate(obj)
    except ValidationError as err:
        detail = "; ".join(("{}: ".format(".".join(map(str, e["loc"]))) if e["loc"] else "")
                           + e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise Rejected(_schema_kind(err), detail) from None
    chars = 0
    for i, m in enumerate(record.messages):
        try:
            m.content.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. "\ud800" escaped in the JSON: a lone surrogate
            raise Rejected("not UTF-8", f"messages.{i}: unpaired surrogate {m.content[err.start]!r} at character "
                                        f"{err.start}") from None
        chars += len(m.content)
    if chars > data.max_text_chars:
        raise Rejected("text too long", f"{chars} characters, over data.max_text_chars={data.max_text_chars}")
    return record


def maybe_id(raw: bytes) -> str | None:
    """The id of a line rejected before it became a Record, if it has one. Never raises: it runs
    inside the error handlers (a line nested too deep for the parser fails here as it did there)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else None
