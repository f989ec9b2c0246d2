"""`sdnode smoke`: one generation on every instance at once, each image checked and saved, then a grid."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdnode.day2 import Day2Error
from sdnode.day2.remote import NodeSession
from sdnode.day2.service import probe_host

DEFAULT_PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"
DEFAULT_SEED = 42


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise Day2Error(f"--size must look like 512x512, got {text!r}")
    return int(parts[0]), int(parts[1])


def request_body(prompt: str, seed: int, size: str | None, steps: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "n": 1, "response_format": "b64_json", "seed": seed}
    if size:
        body["size"] = size
    if steps is not None:
        body["steps"] = steps
    return body


@dataclass
class SmokeResult:
    label: str  # <host>-<N>
    ok: bool
    seconds: float
    detail: str  # the saved path, or why it failed
    image: Image.Image | None = None


def error_detail(status: int, text: str) -> str:
    """The service's own message from an error answer (FastAPI `detail` or OpenAI-style `error.message`)."""
    try:
        data = json.loads(text)
    except ValueError:
        return f"HTTP {status}: {text.strip()[:200]}"
    message = data.get("detail") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = data["error"].get("message") or message
    if not isinstance(message, str):
        message = json.dumps(message if message is not None else data)[:200]
    return f"HTTP {status}: {message}"


def decode_png(payload: dict[str, Any], size: tuple[int, int] | None) -> tuple[bytes, Image.Image]:
    """The first image of an images/generations answer, verified as a PNG of the asked size."""
    try:
        b64 = payload["data"][0]["b64_json"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the answer holds no data[0].b64_json") from None
    raw = base64.b64decode(b64, validate=True)
    image = Image.open(io.BytesIO(raw))
    if image.format != "PNG":
        raise ValueError(f"got a {image.format} image, not a PNG")
    image.load()
    if size is not None and image.size != size:
        raise ValueError(f"got a {image.width}x{image.height} image, asked for {size[0]}x{size[1]}")
    return raw, image


def generate(
    session: NodeSession, instance: int, token: str, body: dict[str, Any], out_dir: Path, timeout: float
) -> SmokeResult:
    node = session.node
    label = f"{node.name}-{instance}"
    path = out_dir / f"{label}.png"
    path.unlink(missing_ok=True)  # an image left from an earlier run must not pass for this one
    started = time.monotonic()
    size = parse_size(body["size"]) if body.get("size") else None
    try:
        answer = session.http(
            "POST",
            node.service_port(instance),
            "/v1/images/generations",
            token=token,
            body=body,
            timeout=timeout,
            host=probe_host(node),
        )
        if answer.status != 200:
            raise Day2Error(error_detail(answer.status, answer.text))
        raw, image = decode_png(answer.json(), size)
    except Day2Error as exc:
        return SmokeResult(label, False, time.monotonic() - started, str(exc).removeprefix(f"{node.name}: "))
    except ValueError as exc:
        return SmokeResult(label, False, time.monotonic() - started, f"bad image: {exc}")
    path.write_bytes(raw)
    return SmokeResult(label, True, time.monotonic() - started, str(path), image)
