#!/usr/bin/env python3
"""Smoke images on the controller.

contact_sheet.py decode --size WxH FILE.png.b64   -> writes FILE.png after checking it decodes
                                                    as a PNG of exactly that size; prints a summary
contact_sheet.py sheet --out SHEET.png A.png B.png -> one labelled grid of every image
"""

import argparse
import base64
import hashlib
import io
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABEL_H = 18
CELL = 256


def decode(src: Path, size: str) -> int:
    want = tuple(int(x) for x in size.split("x"))
    data = base64.b64decode(src.read_text(), validate=True)
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # a truncated or corrupt PNG fails here, not later
        if img.format != "PNG":
            sys.exit(f"{src}: not a PNG but {img.format}")
        if img.size != want:
            sys.exit(f"{src}: size {img.size[0]}x{img.size[1]}, requested {size}")
    out = src.with_suffix("")  # x.png.b64 -> x.png
    out.write_bytes(data)
    src.unlink()
    print(f"{out.name}: PNG {size}, {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    return 0


def sheet(out: Path, images: list[Path]) -> int:
    if not images:
        sys.exit("contact_sheet: no images to put on the sheet")
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * CELL, rows * (CELL + LABEL_H)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, path in enumerate(images):
        x, y = (i % cols) * CELL, (i // cols) * (CELL + LABEL_H)
        with Image.open(path) as img:
            thumb = img.convert("RGB")
            scale = CELL / max(thumb.size)  # tiny test images are blown up (pixelated) to be seen
            size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
            thumb = thumb.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
            canvas.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        draw.text((x + 4, y + CELL + 3), path.stem, fill="black", font=font)
    canvas.save(out, "PNG")
    print(f"{out}: {len(images)} images, {cols}x{rows}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--size", required=True)
    d.add_argument("file", type=Path)
    s = sub.add_parser("sheet")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("images", nargs="*", type=Path)
    a = ap.parse_args()
    return decode(a.file, a.size) if a.cmd == "decode" else sheet(a.out, a.images)


if __name__ == "__main__":
    sys.exit(main())
