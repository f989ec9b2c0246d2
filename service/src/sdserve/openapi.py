"""The OpenAPI document, true to this instance: its limits, its model and its samplers in the
request schemas, and only the error statuses and shapes the routes really answer.

The request models are static; what depends on the settings is written into the document here,
so a client (or schemathesis) reads the same limits the service enforces.
"""

from __future__ import annotations

from typing import Any

from .schedulers import SAMPLERS, SCHEDULES, combined_names
from .settings import Settings

_EMPTY = [None, False, 0, "", [], {}]


def _sizes(max_side: int) -> str:
    return "|".join(str(v) for v in range(64, max_side + 1, 8))


def _set(prop: dict[str, Any], **values: Any) -> None:
    """Constrain a property, or the non-null branch of an optional one."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(values)


def _sampler_names() -> list[str]:
    return sorted({*combined_names(), *(a for s in SAMPLERS for a in s.aliases)})


def _schedule_names() -> list[str]:
    return sorted({n for s in SCHEDULES for n in (s.name, s.label)})


def describe(
    doc: dict[str, Any],
    settings: Settings,
    model_id: str,
    at_default: dict[str, dict[str, tuple]],
    options: dict[str, Any],
) -> dict:
    """`doc` as FastAPI made it, completed for these settings; `at_default` are A1111's fields
    accepted only at their defaults, by request schema, `options` the A1111 options in force."""
    schemas = doc["components"]["schemas"]
    title = options["sd_model_checkpoint"]

    openai = schemas["ImageGenerationRequest"]["properties"]
    for name in ("prompt", "negative_prompt"):
        _set(openai[name], maxLength=settings.max_prompt_chars)
    _set(openai["n"], maximum=settings.max_images)
    sizes = _sizes(settings.max_side)
    _set(openai["size"], pattern=f"^(?:{sizes})x(?:{sizes})$")
    _set(openai["steps"], maximum=settings.max_steps)
    _set(openai["scheduler"], enum=_sampler_names())
    _set(openai["model"], enum=[model_id])
    if settings.output_dir is None:
        openai["response_format"]["enum"] = ["b64_json"]

    for schema, accepted in at_default.items():
        a1111 = schemas[schema]
        props = a1111["properties"]
        for name in ("width", "height"):
            _set(props[name], minimum=64, maximum=settings.max_side, multipleOf=8)
        for name in ("batch_size", "n_iter"):
            _set(props[name], maximum=settings.max_images)
        _set(props["steps"], maximum=settings.max_steps)
        for name in ("prompt", "negative_prompt"):
            _set(props[name], maxLength=settings.max_prompt_chars)
        for name in ("sampler_name", "sampler_index"):
            _set(props[name], enum=_sampler_names())
        _set(props["scheduler"], enum=_schedule_names())
        for field, allowed in accepted.items():
            props[field] = {**props[field], "enum": list(allowed)}
            props[field].pop("anyOf", None)
            props[field].pop("type", None)
        props["enable_hr"]["enum"] = [False]
        if settings.output_dir is None:
            props["save_images"]["enum"] = [False]
        props["override_settings"] = {
            "type": "object",
            "description": "Only the settings this instance runs with: one model, PNG, CLIP skip 1.",
            "properties": {
                "sd_model_checkpoint": {"enum": [model_id, title]},
                "CLIP_stop_at_last_layers": {"const": 1},
                "samples_format": {"const": "png"},
            },
            "additionalProperties": False,
        }
        # Other A1111 fields (extensions' ones) are accepted only empty.
        a1111["additionalProperties"] = {"enum": _EMPTY}

    # POST /sdapi/v1/options takes only the options in force (a no-op, as clients send it).
    doc["paths"]["/sdapi/v1/options"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
        "type": "object",
        "properties": {
            key: {"enum": [model_id, title]} if key == "sd_model_checkpoint" else {"const": value}
            for key, value in options.items()
        },
        "additionalProperties": False,
    }

    # FastAPI documents its own 422 body on every route with parameters; ours differ, and a route
    # without a body never answers 422.
    for path_item in doc["paths"].values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            ref = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if ref.get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc
