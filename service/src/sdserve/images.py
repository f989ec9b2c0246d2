"""Image encoding (PNG, JPEG, WebP) with A1111-style `parameters` text, done off the event loop."""

from __future__ import annotations

import io
import re
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
EXIF_TEXT_BYTES = 60_000  # of UTF-16 text in UserComment: within JPEG's 64 KiB EXIF segment


def encode(image, parameters: str, fmt: str = "png", quality: int | None = None) -> bytes:
    """`image` as `fmt`; JPEG and WebP at `quality` (OpenAI's output_compression, default 100),
    with the parameters in EXIF UserComment as A1111 writes them, where PNG has a text chunk."""
    if fmt == "png":
        return encode_png(image, parameters)
    exif = Image.Exif()
    # JPEG holds at most 64 KiB of EXIF: a longer text (a prompt near a raised MAX_PROMPT_CHARS) is cut.
    comment = parameters.encode("utf-16-be")[: EXIF_TEXT_BYTES & ~1]
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + comment
    buf = io.BytesIO()
    image.save(buf, format=FORMATS[fmt], quality=100 if quality is None else quality, exif=exif)
    return buf.getvalue()


# Keys PIL reads from image files that are no text a user wrote (A1111 leaves them out too).
_NOT_TEXT = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
             "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
             "photoshop", "transparency", "gamma", "aspect", "srgb", "xmp"}  # fmt: skip


def read_infotext(image) -> tuple[str, dict[str, str]]:
    """A1111's png-info: the `parameters` text (a PNG chunk, or EXIF UserComment in JPEG and WebP)
    and the image's other text items."""
    items = {k: v for k, v in image.info.items() if isinstance(v, str) and k not in _NOT_TEXT}
    text = items.pop("parameters", "")
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT) if "exif" in image.info else None
    if not text and isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        text = comment[8:].decode("utf-16-be", "replace")
    elif not text and isinstance(comment, bytes) and comment.startswith(b"ASCII\0\0\0"):
        text = comment[8:].decode("ascii", "replace")
    return text, items


# One `Key: value` of an infotext's last line; a value may be quoted (A1111's re_param).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
MAX_PARAMETERS_LINE = 4096


def parse_infotext(text: str) -> dict[str, str]:
    """An infotext as A1111's parse_generation_parameters reads it: Prompt, Negative prompt, and each
    `Key: value` of the last line (a size also as Key-1 and Key-2)."""
    *lines, last = text.strip().split("\n")
    # The pattern's scan is quadratic in a line without colons: a longer line (no parameters line
    # A1111 writes is) is read as prompt.
    if len(last) > MAX_PARAMETERS_LINE or len(_PARAM.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out


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
