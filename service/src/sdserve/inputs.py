"""Input images for image-to-image and inpainting, free of HTTP: decoded under the service's limits,
fitted to the generation size, and the mask work A1111 does around the pipeline (blur, fill,
"only masked" crops, pasting the result back so that only the masked area is new).

Every function here runs off the event loop (PIL work) and raises Problem naming the field."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageChops, ImageFilter, ImageOps

from .errors import Problem

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def b64_bytes(text: str, field: str) -> bytes:
    """The bytes of base64 text, with or without a `data:image/...;base64,` prefix (A1111 takes both)."""
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise Problem(f"{field}: a data URL without data", field)
    try:
        # Line-wrapped base64 (base64 -w76, openssl) is still base64, as A1111 takes it.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise Problem(f"{field}: not valid base64 ({e})", field) from e


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """A PNG, JPEG or WebP image, loaded only once its header shows it within `max_pixels` (the
    service's pixel budget, below PIL's own decompression-bomb limit, which also applies)."""
    if not data:
        raise Problem(f"{field}: empty image", field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise Problem(
                    f"{field}: {width}x{height} is above the pixel budget of {max_pixels} pixels", field
                )
            image.load()
    except Problem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Problem(f"{field}: image too large ({e})", field) from e
    except Image.UnidentifiedImageError as e:
        raise Problem(f"{field}: not a PNG, JPEG or WebP image", field) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what PIL raises on a broken file
        raise Problem(f"{field}: the image could not be decoded ({type(e).__name__})", field) from e
    return image


def has_alpha(image: Image.Image) -> bool:
    """Whether some pixel is not fully opaque."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 255


def binary_mask(image: Image.Image, invert: bool = False) -> Image.Image:
    """A1111's mask: white (255) is repainted. A transparent RGBA mask's alpha is the mask, else its
    brightness, rounded to black and white."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        grey = image.getchannel("A")
    else:
        grey = image.convert("L")
    mask = grey.point(lambda x: 255 if x > 128 else 0)
    return ImageOps.invert(mask) if invert else mask


def transparent_mask(image: Image.Image) -> Image.Image:
    """OpenAI's mask: fully transparent pixels are the area to edit."""
    return image.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)


def resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's resize modes: 0 just resize; 1 crop and resize (cover, centre crop); 2 resize and fill
    (fit, centred, the bands beside it filled by stretching the image's edge rows or columns)."""
    if image.size == (width, height):
        return image
    if mode == 1:
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    if mode != 2:
        return image.resize((width, height), Image.LANCZOS)
    if width / height < image.width / image.height:  # wider than the target: bands above and below
        w, h = width, max(1, image.height * width // image.width)
    else:
        w, h = max(1, image.width * height // image.height), height
    fitted = image.resize((w, h), Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    x, y = width // 2 - w // 2, height // 2 - h // 2
    out.paste(fitted, (x, y))
    bands = [((width, y), (0, 0, w, 0), (0, 0)), ((width, height - y - h), (0, h, w, h), (0, y + h)),
             ((x, height), (0, 0, 0, h), (0, 0)), ((width - x - w, height), (w, 0, w, h), (x + w, 0))]  # fmt: skip
    for size, edge, at in bands:
        if min(size) > 0:
            out.paste(fitted.resize(size, box=edge), at)
    return out


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0: the masked area painted with ever finer blurs of what surrounds it,
    so the pipeline starts from the surrounding colours rather than from what was there."""
    out = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A1111's "only masked" area: the mask's bounding box plus padding, grown to the generation's
    aspect ratio within the image; None for a blank mask."""
    box = mask.getbbox()
    if box is None:
        return None
    w, h = mask.size
    x1, y1, x2, y2 = (
        max(box[0] - padding, 0),
        max(box[1] - padding, 0),
        min(box[2] + padding, w),
        min(box[3] + padding, h),
    )
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, by: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, min(hi - lo, limit)
    return lo, hi


@dataclass(frozen=True)
class Source:
    """What an image-to-image or inpainting request starts from, ready for the pipeline, and how
    its result goes back into the original."""

    image: Any  # RGB, the generation size: what the pipeline denoises from
    mask: Any = None  # L, the generation size: white is repainted; None for image-to-image
    original: Any = None  # RGB: what the result is pasted into (inpainting)
    overlay: Any = None  # L, original's size: how much of the result shows (0: the original's pixel)
    crop: tuple[int, int, int, int] | None = None  # "only masked": where in the original it was cut

    def paste_back(self, picture: Image.Image) -> Image.Image:
        """The generated picture inside the original: exactly the original's pixels where the overlay
        mask is 0, the generated ones where it is 255, blended in between (the blurred edge)."""
        if self.overlay is None:
            return picture
        base = self.original
        if self.crop is not None:
            x1, y1, x2, y2 = self.crop
            base = base.copy()
            base.paste(picture.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        else:
            base = picture
        return Image.composite(base, self.original, self.overlay)


def img2img_source(image: Image.Image, width: int, height: int, resize_mode: int = 0) -> Source:
    return Source(resize(image.convert("RGB"), resize_mode, width, height))


def inpaint_source(
    image: Image.Image,
    mask: Image.Image,
    width: int,
    height: int,
    *,
    resize_mode: int = 0,
    blur: int = 4,
    fill_masked: bool = False,
    only_masked: bool = False,
    padding: int = 0,
    inside_only: bool = False,
) -> Source:
    """The inpainting input as A1111 builds it. `mask` is binary (255 repaints), the image's size.
    `inside_only`: the blurred edge stays inside the mask (OpenAI edits: nothing outside it changes)."""
    image = image.convert("RGB")
    soft = mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask
    if inside_only:
        soft = ImageChops.darker(soft, mask)
    if only_masked:
        region = crop_region(soft, padding, width, height)
        if region is None:  # a blank mask: A1111 falls back to image-to-image
            return img2img_source(image, width, height, resize_mode)
        start = image.crop(region).resize((width, height), Image.LANCZOS)
        latent_mask = soft.crop(region).resize((width, height), Image.LANCZOS)
        overlay, original = soft, image
    else:
        start = resize(image, resize_mode, width, height)
        latent_mask = resize(soft, resize_mode, width, height)
        original = start
        # A1111 doubles the blurred mask for the overlay: the edge turns new sooner than it fades.
        overlay = latent_mask if inside_only else latent_mask.point(lambda v: min(255, v * 2))
        region = None
    if fill_masked:
        start = fill(start, latent_mask)
    return Source(start, latent_mask, original, overlay, region)
