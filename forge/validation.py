"""Decode untrusted input with its type, turning msgspec's errors into InvalidRequest(field, rule)."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from forge.errors import InvalidRequest

T = TypeVar("T")

_FIELD_IN_MESSAGE = (
    (re.compile(r"unknown field `([^`]+)`"), "unknown_field"),
    (re.compile(r"missing required field `([^`]+)`"), "required"),
)
_FLOAT_FOR_INT = "got `float`"
_RULES = (
    ("of length >=", "min_length"),
    ("of length <=", "max_length"),
    ("multiple of", "multiple_of"),
    (">=", "minimum"),
    ("<=", "maximum"),
    (">", "minimum"),
    ("<", "maximum"),
    ("Invalid enum value", "enum"),
    ("matching regex", "pattern"),
    ("Expected", "type"),
)


def _field_from_path(path: str, prefix: str) -> str:
    field = path.removeprefix("$").lstrip(".")
    return f"{prefix}{field}" if field else prefix.rstrip(".") or "body"


def invalid_request(exc: msgspec.ValidationError, prefix: str = "") -> InvalidRequest:
    text = str(exc)
    message, _, path = text.rpartition(" - at `")
    if not message:
        message, path = text, "$"
    field = _field_from_path(path.rstrip("`"), prefix)
    for pattern, rule in _FIELD_IN_MESSAGE:
        found = pattern.search(message)
        if found:
            where = path.rstrip("`") or "$"
            return InvalidRequest(message, field=_field_from_path(f"{where}.{found.group(1)}", prefix), rule=rule)
    rule = next((name for marker, name in _RULES if marker in message), "invalid")
    return InvalidRequest(f"{field}: {message}", field=field, rule=rule)


def decode_json(body: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        if _FLOAT_FOR_INT in str(exc):
            return convert(_whole_floats_as_ints(msgspec.json.decode(body)), type_)
        raise invalid_request(exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 in strings through raw
        raise InvalidRequest(f"malformed JSON: {exc}", field="body", rule="json") from None


def convert(value: Any, type_: type[T], *, prefix: str = "", strict: bool = True) -> T:
    """Validate an already-parsed object (MCP arguments, query strings) exactly like a JSON body.

    strict=False accepts numbers and booleans written as strings, as query strings carry them."""
    try:
        return msgspec.convert(value, type_, strict=strict)
    except msgspec.ValidationError as exc:
        if _FLOAT_FOR_INT not in str(exc):
            raise invalid_request(exc, prefix) from None
    try:
        return msgspec.convert(_whole_floats_as_ints(value), type_, strict=strict)
    except msgspec.ValidationError as exc:
        raise invalid_request(exc, prefix) from None


def _whole_floats_as_ints(value: Any) -> Any:
    """JSON has one number type: 28.0 is a valid JSON Schema integer, and many clients (Python's json, tool
    calls of language models) write whole numbers that way. Fractions still fail as before."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_floats_as_ints(item) for key, item in value.items()}
    return value
