"""Checks shared by both APIs, against the settings' limits. Errors name the request field."""

from __future__ import annotations

from .engine import GenParams
from .schedulers import UnknownScheduler, resolve
from .settings import Settings


class Problem(Exception):
    """A request the service refuses; `param` names the field."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 422,
        code: str = "invalid_value",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.headers = headers or {}


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
    """`names` maps internal names (width, height, n, steps, scheduler) to the API's field names."""
    f = {
        "width": "width",
        "height": "height",
        "n": "n",
        "steps": "steps",
        "scheduler": "scheduler",
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
        choice = resolve(sampler or settings.default_scheduler, schedule, field_name=f["scheduler"])
    except UnknownScheduler as e:
        raise Problem(str(e), f["scheduler"]) from e
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
