"""`sdnode smoke` (and `make smoke`): one generation on every instance at once, each image checked and saved,
then an image-to-image from it on the same instance (both paths a deploy serves), then a grid."""

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
from sdnode.day2.inventory import Node, as_int, plain
from sdnode.day2.remote import NodeSession
from sdnode.day2.service import Instance

DEFAULT_PROMPT = "a lighthouse on a rocky coast at dawn, oil painting"
DEFAULT_SEED = 42
# How far the image-to-image step redraws the first image: enough to run half the steps.
IMG2IMG_STRENGTH = 0.5


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise Day2Error(f"size must look like 512x512, got {text!r}")
    return int(parts[0]), int(parts[1])


def request_body(prompt: str, seed: int, size: str | None, steps: int | None) -> dict[str, Any]:
    if size:
        parse_size(size)
    if steps is not None and steps < 1:
        raise Day2Error(f"steps must be at least 1, got {steps}")
    body: dict[str, Any] = {"prompt": prompt, "n": 1, "response_format": "b64_json", "seed": seed}
    if size:
        body["size"] = size
    if steps is not None:
        body["steps"] = steps
    return body


def node_request(
    node: Node, prompt: str | None, seed: int | None, size: str | None, steps: int | None
) -> dict[str, Any]:
    """The request for `node`: each setting from the command line, else the inventory's sdnode_smoke_* for
    the host (test nodes serve a tiny 64x64 model), else the default (size and steps: the service's)."""
    v, host = node.vars, node.name
    width, height = v.get("sdnode_smoke_width"), v.get("sdnode_smoke_height")
    if size is None and (width, height) != (None, None):
        if width is None or height is None:
            raise Day2Error(f"host {host}: set sdnode_smoke_width and sdnode_smoke_height together")
        size = f"{as_int(host, 'sdnode_smoke_width', width)}x{as_int(host, 'sdnode_smoke_height', height)}"
    if steps is None and v.get("sdnode_smoke_steps") is not None:
        steps = as_int(host, "sdnode_smoke_steps", v["sdnode_smoke_steps"])
    if seed is None:
        seed = as_int(host, "sdnode_smoke_seed", v.get("sdnode_smoke_seed", DEFAULT_SEED))
    if prompt is None:
        prompt = str(plain(host, "sdnode_smoke_prompt", v.get("sdnode_smoke_prompt") or DEFAULT_PROMPT))
    try:
        return request_body(prompt, seed, size, steps)
    except Day2Error as exc:
        raise Day2Error(f"host {host}: {exc} (from --size/--steps or its sdnode_smoke_*)") from None


@dataclass
class SmokeResult:
    node: str
    instance: int | None  # None: the node failed before its instances were known
    seed: int
    ok: bool
    seconds: float
    detail: str  # the saved path, or why it failed
    image: Image.Image | None = None

    @property
    def label(self) -> str:
        """<host>-<N>, as the image is named."""
        return f"{self.node}-{'?' if self.instance is None else self.instance}"

    def caption(self) -> tuple[str, str]:
        """The two lines under its tile in the grid: node; instance, seed and seconds."""
        instance = "?" if self.instance is None else self.instance
        outcome = f"seed {self.seed}" if self.ok else "FAILED"
        return self.node, f"instance {instance}, {outcome}, {self.seconds:.1f}s"


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


def img2img_body(body: dict[str, Any], png: bytes) -> dict[str, Any]:
    """The A1111 image-to-image request that redraws `png`, the answer to `body`, with the same prompt,
    seed, size and steps."""
    out = {
        "prompt": body["prompt"],
        "init_images": [base64.b64encode(png).decode()],
        "denoising_strength": IMG2IMG_STRENGTH,
        "seed": body["seed"],
        "batch_size": 1,
    }
    if body.get("size"):
        out["width"], out["height"] = parse_size(body["size"])
    if body.get("steps") is not None:
        out["steps"] = body["steps"]
    return out


def decode_png(payload: dict[str, Any], size: tuple[int, int] | None) -> tuple[bytes, Image.Image]:
    """The first image of an images/generations answer (or an A1111 one's `images`), verified as a PNG
    of the asked size."""
    try:
        b64 = payload["images"][0] if "images" in payload else payload["data"][0]["b64_json"]
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
    session: NodeSession, instance: Instance, token: str, body: dict[str, Any], out_dir: Path, timeout: float
) -> SmokeResult:
    node = session.node
    path = out_dir / f"{node.name}-{instance.index}.png"
    redrawn = out_dir / f"{node.name}-{instance.index}-img2img.png"
    for old in (path, redrawn):
        old.unlink(missing_ok=True)  # an image left from an earlier run must not pass for this one
    started = time.monotonic()
    size = parse_size(body["size"]) if body.get("size") else None

    def result(ok: bool, detail: str, image: Image.Image | None = None) -> SmokeResult:
        seconds = time.monotonic() - started
        return SmokeResult(node.name, instance.index, body["seed"], ok, seconds, detail, image)

    def post(route: str, request: dict[str, Any]) -> tuple[bytes, Image.Image]:
        answer = session.http("POST", f"{instance.url}{route}", token=token, body=request, timeout=timeout)
        if answer.status != 200:
            raise Day2Error(error_detail(answer.status, answer.text))
        return decode_png(answer.json(), size)

    step = "text to image"
    try:
        raw, image = post("/v1/images/generations", body)
        path.write_bytes(raw)
        step = "image to image from it"
        redrawn.write_bytes(post("/sdapi/v1/img2img", img2img_body(body, raw))[0])
    except Day2Error as exc:
        return result(False, f"{step}: {str(exc).removeprefix(f'{node.name}: ')}")
    except ValueError as exc:
        return result(False, f"{step}: bad image: {exc}")
    return result(True, f"{path} (image to image: {redrawn.name})", image)
