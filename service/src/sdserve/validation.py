"""Checks shared by both APIs, against the settings' limits. Errors name the request field."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from .engine import GenParams
from .errors import Problem
from .schedulers import UnknownScheduler, resolve
from .settings import Settings

__all__ = ["Problem", "build_params", "check_prompt", "check_texts", "text_problem"]


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


def check_prompt(settings: Settings, text: str, param: str) -> None:
    if len(text) > settings.max_prompt_chars:
        raise Problem(f"{param} is {len(text)} characters; the limit is {settings.max_prompt_chars}", param)


def build_params(
    settings: Settings,
    *,
    width: int,
    height: int,
    n: int,
    steps: int | None,
    guidance: float | None,
    sampler: str | None,
    schedule: str | None,
    has_negative: bool,
    eta: float | None = None,
    names: dict[str, str] | None = None,
) -> GenParams:
    """`names` maps internal names (width, height, n, steps, scheduler, schedule, pixels) to the
    API's field names."""
    f = {
        "width": "width",
        "height": "height",
        "n": "n",
        "steps": "steps",
        "scheduler": "scheduler",
        "schedule": "scheduler",
        "pixels": "size",
        **(names or {}),
    }
    for key, value in (("width", width), ("height", height)):
        if value % 8 or not 64 <= value <= settings.max_side:
            raise Problem(
                f"{f[key]}: {key} {value} must be a multiple of 8 between 64 and {settings.max_side}", f[key]
            )
    if not 1 <= n <= settings.max_images:
        raise Problem(f"{f['n']}: {n} images asked; allowed 1 to {settings.max_images}", f["n"])
    if n * width * height > settings.max_pixels:
        raise Problem(
            f"{f['pixels']}: {n} x {width}x{height} = {n * width * height} pixels is above the per-request budget of {settings.max_pixels}",
            f["pixels"],
        )
    steps = settings.default_steps if steps is None else steps
    if not 1 <= steps <= settings.max_steps:
        raise Problem(f"{f['steps']}: {steps} steps; allowed 1 to {settings.max_steps}", f["steps"])
    try:
        choice = resolve(
            sampler or settings.default_scheduler,
            schedule,
            field_name=f["scheduler"],
            schedule_field=f["schedule"],
        )
    except UnknownScheduler as e:
        raise Problem(str(e), f["schedule"] if e.part == "schedule" else f["scheduler"]) from e
    limit = choice.sampler.max_steps
    if limit is not None and steps > limit:
        raise Problem(
            f"{f['steps']}: {steps} steps; {choice.sampler.name} allows at most {limit}", f["steps"]
        )
    if eta is not None and choice.sampler.ancestral and eta != 1.0:
        raise Problem(f"eta: {eta} is not supported with {choice.sampler.name}; only 1.0", "eta")
    guidance = settings.default_guidance if guidance is None else guidance
    return GenParams(
        width,
        height,
        steps,
        float(guidance),
        choice,
        has_negative,
        eta if choice.sampler.name == "DDIM" else None,
    )
