"""Image encoding (PNG, JPEG, WebP) with A1111-style `parameters` text, done off the event loop."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .engine import GenParams


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str
    params: GenParams
    seed: int
    model: str

    def __str__(self) -> str:
        p = self.params
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {p.steps}",
            f"Sampler: {p.scheduler.sampler.name}",
            f"Schedule type: {p.scheduler.schedule.label}",
            f"CFG scale: {p.guidance:g}",
            f"Seed: {self.seed}",
            f"Size: {p.width}x{p.height}",
            *([f"Denoising strength: {p.strength:g}"] if p.strength is not None else []),
            f"Model: {self.model}",
            f"Version: sdserve {__version__}",
        ]
        lines.append(", ".join(fields))
        return "\n".join(lines)


def encode_png(image, parameters: str) -> bytes:
    meta = PngInfo()
    meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta, compress_level=4)
    return buf.getvalue()


# Output formats as OpenAI names them, and what PIL and HTTP call them.
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def encode(image, parameters: str, fmt: str = "png", quality: int | None = None) -> bytes:
    """`image` as `fmt`; JPEG and WebP at `quality` (OpenAI's output_compression, default 100),
    with the parameters in EXIF UserComment as A1111 writes them, where PNG has a text chunk."""
    if fmt == "png":
        return encode_png(image, parameters)
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    buf = io.BytesIO()
    image.save(buf, format=FORMATS[fmt], quality=100 if quality is None else quality, exif=exif)
    return buf.getvalue()


def expired(path: Path, retention_s: float, now: float | None = None) -> bool:
    """An image past the output retention (0: none ever is)."""
    if retention_s <= 0:
        return False
    try:
        return path.stat().st_mtime < (now or time.time()) - retention_s
    except FileNotFoundError:
        return True


def sweep_outputs(directory: Path, retention_s: float) -> int:
    """Delete the output images (and half-written ones) past the retention; returns how many."""
    now, removed = time.time(), 0
    for path in [p for ext in (*FORMATS, "part") for p in directory.glob(f"*.{ext}")]:
        if expired(path, retention_s, now):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
