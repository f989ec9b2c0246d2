"""A labelled contact sheet of smoke images: one tile per instance, its label in a strip under it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 16
PAD = 4
BACKGROUND = (24, 24, 24)
FOREGROUND = (235, 235, 235)


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


def _fit(label: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(label, font=font) <= width:
        return label
    while label and draw.textlength(label + "...", font=font) > width:
        label = label[:-1]
    return label + "..."


def make_grid(tiles: Sequence[tuple[str, Image.Image | None]]) -> Image.Image:
    """One image holding every (label, image) tile; a missing image (failed instance) is a dark tile
    whose label says so. Tiles of different sizes are placed in cells of the largest."""
    columns, rows = grid_shape(len(tiles))
    sizes = [img.size for _, img in tiles if img is not None] or [(64, 64)]
    tile_w = max(max(w for w, _ in sizes), 96)  # wide enough for a short label under 64 px images
    tile_h = max(h for _, h in sizes)
    cell = (tile_w + PAD, tile_h + LABEL_HEIGHT + PAD)
    sheet = Image.new("RGB", (PAD + columns * cell[0], PAD + rows * cell[1]), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, (label, image) in enumerate(tiles):
        x, y = tile_origin(index, columns, cell)
        if image is not None:
            sheet.paste(image.convert("RGB"), (x + (tile_w - image.width) // 2, y))
        else:
            label = f"{label} FAILED"
        draw.text((x + 2, y + tile_h + 2), _fit(label, draw, font, tile_w - 4), fill=FOREGROUND, font=font)
    return sheet
