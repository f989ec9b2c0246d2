"""A1111 sampler and schedule-type names, mapped to diffusers schedulers.

A fresh scheduler is built for every pipeline call from the model's own scheduler
config: diffusers schedulers keep per-call state (step index, model outputs), so
sharing one between calls corrupts both.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    name: str
    cls: str
    aliases: tuple[str, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    default_schedule: str = "uniform"  # what A1111's "automatic" picks for this sampler
    ancestral: bool = False
    needs: str | None = None  # an optional module the diffusers scheduler needs
    max_steps: int | None = None  # most steps the diffusers scheduler accepts, where it has a limit


@dataclass(frozen=True)
class Schedule:
    name: str
    label: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


SAMPLERS: tuple[Sampler, ...] = (
    Sampler(
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_2m",),
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "karras",
    ),
    Sampler(
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_2m_sde",),
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        "exponential",
    ),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", ("k_euler_a", "k_euler_ancestral"), ancestral=True),
    Sampler("Euler", "EulerDiscreteScheduler", ("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", ("k_lms",), needs="scipy"),
    Sampler("Heun", "HeunDiscreteScheduler", ("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", ("k_dpm_2",), default_schedule="karras"),
    Sampler(
        "DPM2 a", "KDPM2AncestralDiscreteScheduler", ("k_dpm_2_a",), default_schedule="karras", ancestral=True
    ),
    Sampler("DDIM", "DDIMScheduler", ("ddim",)),
    Sampler("PNDM", "PNDMScheduler", ("PLMS", "plms", "pndm")),
    Sampler("UniPC", "UniPCMultistepScheduler", ("unipc",)),
    Sampler("DEIS", "DEISMultistepScheduler", ("deis",), {"algorithm_type": "deis"}),
    # LCMScheduler refuses more steps than its original_inference_steps (50).
    Sampler("LCM", "LCMScheduler", ("lcm",), max_steps=50),
)
# Offer only what this install can run (scipy is optional).
SAMPLERS = tuple(s for s in SAMPLERS if s.needs is None or importlib.util.find_spec(s.needs))

_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic"),
    Schedule("uniform", "Uniform"),
    Schedule("karras", "Karras", {"use_karras_sigmas": True}),
    Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}),
    Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}),
) + ((Schedule("beta", "Beta", {"use_beta_sigmas": True}),) if importlib.util.find_spec("scipy") else ())


class UnknownScheduler(ValueError):
    """The message lists the valid names; `part` says which input was wrong: "sampler" (a sampler
    or a combined name) or "schedule" (the separate schedule type)."""

    def __init__(self, message: str, part: str = "sampler") -> None:
        super().__init__(message)
        self.part = part


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().replace("_", " ").split())


_SAMPLER_BY_NAME = {_norm(n): s for s in SAMPLERS for n in (s.name, *s.aliases)}
_SCHEDULE_BY_NAME = {_norm(n): s for s in SCHEDULES for n in (s.name, s.label)}


def _accepts(cls_name: str) -> set[str]:
    import diffusers

    return set(inspect.signature(getattr(diffusers, cls_name).__init__).parameters)


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def combined_names() -> list[str]:
    """Every valid combined name ("DPM++ 2M Karras")."""
    out = []
    for s in SAMPLERS:
        out.append(s.name)
        out += [f"{s.name} {sch.label}" for sch in SCHEDULES if sch.name != "automatic" and _supports(s, sch)]
    return out


def valid_names_text() -> str:
    return (
        f"valid samplers: {', '.join(sampler_names())}; schedule types: {', '.join(s.label for s in SCHEDULES)} "
        '(combine as "<sampler> <schedule type>", e.g. "DPM++ 2M Karras")'
    )


def _supports(sampler: Sampler, schedule: Schedule) -> bool:
    return set(schedule.kwargs) <= _accepts(sampler.cls)


@dataclass(frozen=True)
class SchedulerChoice:
    sampler: Sampler
    schedule: Schedule  # never "automatic": resolved to the sampler's default

    @property
    def label(self) -> str:
        return f"{self.sampler.name} {self.schedule.label}"

    def build(self, base_config: Any):
        """A new scheduler instance for one pipeline call."""
        import diffusers

        cls = getattr(diffusers, self.sampler.cls)
        accepted = _accepts(self.sampler.cls)
        overrides: dict[str, Any] = {k: False for k in _SIGMA_FLAGS if k in accepted}
        overrides.update(self.sampler.kwargs)
        overrides.update(self.schedule.kwargs)
        return cls.from_config(base_config, **overrides)


def resolve(
    sampler: str | None,
    schedule: str | None = None,
    *,
    field_name: str = "scheduler",
    schedule_field: str = "scheduler",
) -> SchedulerChoice:
    """Resolve A1111-style names. `sampler` may be a combined name ("DPM++ 2M Karras")
    when `schedule` is None or "automatic". Messages name the request's fields."""
    if not sampler or not sampler.strip():
        raise UnknownScheduler(f"{field_name}: empty name")
    key = _norm(sampler)
    found = _SAMPLER_BY_NAME.get(key)
    sched: Schedule | None = None
    if found is None:
        # Longest sampler name that prefixes the text, the rest a schedule type.
        for name in sorted(_SAMPLER_BY_NAME, key=len, reverse=True):
            if key.startswith(name + " ") and key[len(name) + 1 :] in _SCHEDULE_BY_NAME:
                found, sched = _SAMPLER_BY_NAME[name], _SCHEDULE_BY_NAME[key[len(name) + 1 :]]
                break
    if found is None:
        raise UnknownScheduler(f"{field_name}: unknown sampler {sampler!r}; {valid_names_text()}")
    part = "sampler"  # which input chose the schedule type
    if schedule is not None and _norm(schedule) not in ("", "automatic"):
        explicit = _SCHEDULE_BY_NAME.get(_norm(schedule))
        if explicit is None:
            names = ", ".join(s.name for s in SCHEDULES)
            raise UnknownScheduler(
                f"{schedule_field}: unknown schedule type {schedule!r}; valid: {names}", "schedule"
            )
        # A combined name's schedule type wins over the separate one, as in A1111.
        part = "sampler" if sched is not None else "schedule"
        sched = sched or explicit
    if sched is None or sched.name == "automatic":
        sched = _SCHEDULE_BY_NAME[found.default_schedule]
    if not _supports(found, sched):
        raise UnknownScheduler(
            f"{schedule_field if part == 'schedule' else field_name}: sampler {found.name!r} does not support schedule type {sched.label!r}; "
            f"it supports: {', '.join(s.label for s in SCHEDULES if _supports(found, s))}",
            part,
        )
    return SchedulerChoice(found, sched)
