"""PNG encoding with A1111-style `parameters` text, done off the event loop."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

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
    for path in [*directory.glob("*.png"), *directory.glob("*.part")]:
        if expired(path, retention_s, now):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
