"""What every request body must be (RequestModel): JSON as its schema types it, valid Unicode.
The settings' limits are checked where a spec is made (generation.make_spec)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from .errors import Problem

__all__ = ["Problem", "check_texts", "text_problem"]


def text_problem(text: str) -> str | None:
    """Why a text is not valid Unicode, or None: JSON can carry a lone surrogate ("\\ud800"), which
    no UTF-8 encoder takes, so it would fail later in a tokenizer, a PNG or a JSON response."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains an unpaired surrogate (\\u{ord(text[e.start]):04x}) at character {e.start}; it is not valid Unicode text"
    return None


def check_texts(value: Any, path: str = "") -> None:
    """Refuse (422, naming the field) any text in `value`, keys included, that text_problem faults."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            # The path may hold the faulty text itself (a key): escaped, so the error can be sent.
            path = path.encode("utf-8", "backslashreplace").decode("utf-8")
            raise Problem(f"{path}: {problem}" if path else problem, path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            check_texts(str(key), sub)
            check_texts(item, sub)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_texts(item, f"{path}.{i}")


class RequestModel(BaseModel):
    """Base of every request body: JSON types as the OpenAPI document gives them (strict: `true`
    is not 1 step, "5" is not a number; an integer may stand for a float), finite numbers, and
    texts, extra fields' included, that are valid Unicode, so that nothing a client sends can fail
    later in a tokenizer, a PNG text chunk or a JSON response."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: Any) -> Any:
        check_texts(data, "")
        if isinstance(data, dict):
            # JSON Schema's integer includes 2.0; strict mode would refuse it for an int field.
            data = {
                name: int(value)
                if isinstance(value, float) and value.is_integer() and _is_int(cls.model_fields.get(name))
                else value
                for name, value in data.items()
            }
        return data


def _is_int(field: Any) -> bool:
    """A field typed int, or int | None."""
    if field is None:
        return False
    return field.annotation is int or set(typing.get_args(field.annotation)) == {int, type(None)}
