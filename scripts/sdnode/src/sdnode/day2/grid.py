"""The smoke run's grid: one tile per instance, its caption (node; instance, seed, seconds) under it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256  # smaller images (the tiny test model's 64 px) are blown up by whole factors to be seen
FONT_SIZE = 15
LINE_HEIGHT = FONT_SIZE + 5
LABEL_HEIGHT = 2 * LINE_HEIGHT + 4
PAD = 6
BACKGROUND = (24, 24, 24)
FOREGROUND = (235, 235, 235)
FAILED = (230, 70, 70)


def grid_shape(count: int) -> tuple[int, int]:
    """(columns, rows) of a near-square grid for `count` tiles, wider than tall when not square."""
    if count < 1:
        raise ValueError("a grid needs at least one image")
    columns = math.ceil(math.sqrt(count))
    return columns, math.ceil(count / columns)


def tile_origin(index: int, columns: int, cell: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of tile `index` (row-major), cells of `cell` (w, h) including label and padding."""
    row, column = divmod(index, columns)
    return PAD + column * cell[0], PAD + row * cell[1]


def enlarged(image: Image.Image) -> Image.Image:
    """`image` scaled up by the smallest whole factor that makes its longer side MIN_TILE or more; pixels
    kept sharp (nearest), so a tiny image shows what it is."""
    factor = max(1, math.ceil(MIN_TILE / max(image.size)))
    rgb = image.convert("RGB")
    if factor == 1:
        return rgb
    return rgb.resize((rgb.width * factor, rgb.height * factor), Image.Resampling.NEAREST)


def _fit(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def make_grid(tiles: Sequence[tuple[Sequence[str], Image.Image | None]]) -> Image.Image:
    """One image holding every (caption lines, image) tile; a missing image (a failed instance) is a dark
    tile marked FAILED. Tiles of different sizes are centred in cells of the largest."""
    columns, rows = grid_shape(len(tiles))
    images = [enlarged(img) if img is not None else None for _, img in tiles]
    sizes = [img.size for img in images if img is not None] or [(MIN_TILE, MIN_TILE)]
    tile_w, tile_h = max(w for w, _ in sizes), max(h for _, h in sizes)
    cell = (tile_w + PAD, tile_h + LABEL_HEIGHT + PAD)
    sheet = Image.new("RGB", (PAD + columns * cell[0], PAD + rows * cell[1]), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    for index, ((lines, _), image) in enumerate(zip(tiles, images, strict=True)):
        x, y = tile_origin(index, columns, cell)
        if image is not None:
            sheet.paste(image, (x + (tile_w - image.width) // 2, y + (tile_h - image.height) // 2))
        else:
            draw.text((x + tile_w // 2, y + tile_h // 2), "FAILED", fill=FAILED, font=font, anchor="mm")
        for row, line in enumerate(lines[:2]):
            colour = FAILED if image is None and row else FOREGROUND
            at = (x + 2, y + tile_h + 2 + row * LINE_HEIGHT)
            draw.text(at, _fit(line, draw, font, tile_w - 4), fill=colour, font=font)
    return sheet
