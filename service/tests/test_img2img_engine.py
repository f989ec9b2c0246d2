"""Image-to-image and inpainting in the engine, without HTTP: pipelines made from the loaded
components, batching by mode, per-image seeds, and the mask work around the pipeline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import Gate
from PIL import Image
from test_engine import engine, loaded, pixels, sdxl_model  # noqa: F401  (fixtures)

from sdserve.engine import GenParams
from sdserve.inputs import binary_mask, crop_region, inpaint_source
from sdserve.schedulers import resolve

P = GenParams(64, 64, 4, 7.0, resolve("Euler a"))
I2I = dataclasses.replace(P, mode="img2img", strength=0.5)
INPAINT = dataclasses.replace(P, mode="inpaint", strength=1.0)


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def square_mask(x1=24, y1=24, x2=40, y2=40) -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (x1, y1, x2, y2))
    return mask


def test_pipelines_share_the_loaded_components(engine):  # noqa: F811
    e = engine()
    base = e.model.pipe
    for mode, cls in (
        ("img2img", "StableDiffusionImg2ImgPipeline"),
        ("inpaint", "StableDiffusionInpaintPipeline"),
    ):
        pipe = e.pipeline(mode)
        assert type(pipe).__name__ == cls and e.pipeline(mode) is pipe
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            assert getattr(pipe, name) is getattr(base, name), name


def test_img2img_follows_the_image_and_the_seed(engine):  # noqa: F811
    e = engine()
    a, b = picture(1), picture(2)
    one = e.submit(I2I, "x", "", [5], image=a).future.result(60)[0].image
    again = e.submit(I2I, "x", "", [5], image=a).future.result(60)[0].image
    other_image = e.submit(I2I, "x", "", [5], image=b).future.result(60)[0].image
    other_seed = e.submit(I2I, "x", "", [6], image=a).future.result(60)[0].image
    assert one.tobytes() == again.tobytes()
    assert one.tobytes() != other_image.tobytes() and one.tobytes() != other_seed.tobytes()
    # Strength 0.5 keeps much of the input: closer to it than to the other input.
    assert np.abs(pixels(one) - pixels(a)).mean() < np.abs(pixels(one) - pixels(b)).mean()


def test_img2img_requests_batch_together_but_not_with_txt2img(engine):  # noqa: F811
    """Compatible img2img requests share a batch, each with its own image and seeds; txt2img, another
    strength and inpainting at the same strength each run apart."""
    gate = Gate()
    e = engine(gate=gate)
    blocker = e.submit(P, "blocker", "", [0])
    assert gate.entered.wait(30)
    first = e.submit(I2I, "x", "", [7], image=picture(1))
    text = e.submit(P, "y", "", [8])
    second = e.submit(I2I, "z", "", [9, 10], image=picture(2))
    stronger = e.submit(dataclasses.replace(I2I, strength=0.75), "z", "", [11], image=picture(2))
    src = inpaint_source(picture(3), square_mask(), 64, 64)
    inpaint = e.submit(
        dataclasses.replace(INPAINT, strength=0.5), "z", "", [12], image=src.image, mask=src.mask
    )
    gate.open()
    for r in (blocker, first, text, second, stronger, inpaint):
        r.future.result(60)
    assert gate.calls == [1, 3, 1, 1, 1], gate.calls
    for req, image in ((first, picture(1)), (second, picture(2))):
        alone = e.submit(I2I, req.prompt, "", req.seeds, image=image).future.result(60)
        for a, b in zip(alone, req.future.result(), strict=True):
            assert np.abs(pixels(a.image) - pixels(b.image)).mean() < 1


def test_inpainting_runs_and_progress_counts_skipped_steps(engine):  # noqa: F811
    e = engine()
    src = inpaint_source(picture(3), square_mask(), 64, 64, blur=0)
    out = e.submit(INPAINT, "x", "", [1, 2], image=src.image, mask=src.mask).future.result(60)
    assert [o.image.size for o in out] == [(64, 64), (64, 64)]
    req = e.submit(I2I, "x", "", [1], image=picture(1))
    req.future.result(60)
    assert e.last_batch.step == I2I.steps  # 2 run of 4, the 2 skipped count as done


def test_mode_needs_its_inputs(engine):  # noqa: F811
    e = engine()
    with pytest.raises(ValueError):
        e.submit(I2I, "x", "", [1])
    with pytest.raises(ValueError):
        e.submit(INPAINT, "x", "", [1], image=picture())
    with pytest.raises(ValueError):
        e.submit(P, "x", "", [1], image=picture())


@pytest.mark.parametrize("blur", [0, 4])
def test_paste_back_keeps_the_original_outside_the_mask(blur):
    original = picture(4)
    src = inpaint_source(original, square_mask(), 64, 64, blur=blur)
    new = src.paste_back(Image.new("RGB", (64, 64), (1, 2, 3)))
    got, orig = np.asarray(new), np.asarray(original)
    assert (got[24:40, 24:40] == (1, 2, 3)).all() if blur == 0 else (got[30:34, 30:34] == (1, 2, 3)).all()
    far = np.ones((64, 64), bool)
    reach = 0 if blur == 0 else 3 * blur  # a Gaussian's reach in PIL's box approximation
    far[24 - reach : 40 + reach, 24 - reach : 40 + reach] = False
    assert (got[far] == orig[far]).all()
    assert blur == 0 or (got[~far] != orig[~far]).any()


def test_only_masked_crops_around_the_mask_and_pastes_into_the_original():
    original = Image.fromarray(np.random.default_rng(5).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (100, 10, 110, 30))
    assert crop_region(mask, 0, 64, 64) == (95, 10, 115, 30)  # grown to a square around the mask
    assert crop_region(mask, 8, 64, 64) == (87, 2, 123, 38)  # padded, then squared
    src = inpaint_source(original, mask, 64, 64, blur=0, only_masked=True)
    assert src.image.size == (64, 64) and src.crop == (95, 10, 115, 30)
    new = np.asarray(src.paste_back(Image.new("RGB", (64, 64), (9, 9, 9))))
    assert new.shape == (96, 128, 3) and (new[10:30, 100:110] == 9).all()
    outside = np.asarray(mask) == 0
    assert (new[outside] == np.asarray(original)[outside]).all()


def test_masks_from_alpha_brightness_and_inverted():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    rgba.putpixel((1, 1), (0, 0, 0, 0))
    assert binary_mask(rgba).getpixel((1, 1)) == 0 and binary_mask(rgba).getpixel((0, 0)) == 255
    grey = Image.new("L", (8, 8), 200)
    assert binary_mask(grey).getpixel((0, 0)) == 255 and binary_mask(grey, invert=True).getpixel((0, 0)) == 0


def test_interrupt_stops_only_the_callers_batch(engine):  # noqa: F811
    """With several keys, an interrupt stops a batch only when every request in it is the caller's."""
    e = engine()
    for others, expect in ((["b"], 4), ([], 1)):
        first, second = Gate(), Gate()
        e.before_pipeline_call = first
        blocker = e.submit(P, "blocker", "", [0], key_name="z")
        assert first.entered.wait(30)
        reqs = [e.submit(P, "x", "", [1], key_name=k) for k in ("a", *others)]
        e.before_pipeline_call = second  # the next call, the batch of reqs, waits here
        first.open()
        blocker.future.result(60)
        assert second.entered.wait(30) and second.calls == [len(reqs)]
        assert e.interrupt("a") == 1
        second.open()
        for r in reqs:
            r.future.result(60)
        assert e.last_batch.step == expect and e.last_batch.interrupted == (expect == 1)


@pytest.mark.parametrize("pixels", [100_000_000, 200_000_000])
def test_decompression_bombs_are_refused_even_within_the_pixel_budget(pixels):
    """PIL's own limit (a warning above MAX_IMAGE_PIXELS, an error above twice it) holds even where
    the service's budget would allow the image: both are a 422 naming the field."""
    import io

    from sdserve.errors import Problem
    from sdserve.inputs import open_image

    buf = io.BytesIO()
    Image.new("1", (10_000, pixels // 10_000)).save(buf, format="PNG")  # a few KB
    with pytest.raises(Problem) as e:
        open_image(buf.getvalue(), "init_images.0", max_pixels=10**12)
    assert e.value.param == "init_images.0" and "too large" in e.value.message


def test_resize_modes():
    from sdserve.inputs import resize

    wide = Image.new("RGB", (64, 32), (200, 0, 0))
    wide.paste((0, 0, 200), (0, 0, 64, 1))  # a blue top row
    wide.paste((0, 200, 0), (0, 31, 64, 32))  # a green bottom row
    wide.paste((200, 200, 0), (0, 1, 8, 31))  # a yellow left edge, which a centre crop cuts
    assert resize(wide, 0, 64, 64).size == (64, 64)
    assert np.asarray(resize(wide, 0, 64, 64))[32, 32].tolist() == [200, 0, 0]  # stretched
    cropped = np.asarray(resize(wide, 1, 32, 32))  # cover: the full height kept, the sides cut
    assert cropped.shape == (32, 32, 3) and cropped[0, 16].tolist() == [0, 0, 200]
    assert cropped[16, 0].tolist() == [200, 0, 0] and np.asarray(resize(wide, 0, 32, 32))[16, 0][1] > 100
    filled = np.asarray(resize(wide, 2, 64, 64))  # fit in the middle, bands from the edge rows
    assert filled.shape == (64, 64, 3) and filled[32, 32].tolist() == [200, 0, 0]
    assert filled[0, 32][2] > 150 and filled[63, 32][1] > 150  # top band blue, bottom band green
    tall = resize(Image.new("L", (10, 40), 255), 2, 64, 64)  # a mask, bands beside it
    assert tall.mode == "L" and np.asarray(tall).min() == 255
    assert np.asarray(resize(Image.new("RGB", (64, 63)), 2, 64, 64)).shape == (64, 64, 3)  # a 1-pixel band


def test_sdxl_img2img_and_inpainting_from_the_same_components(make_settings, sdxl_model):  # noqa: F811
    from sdserve.engine import Engine

    e = Engine(make_settings(model=sdxl_model)).start()
    try:
        assert e.wait_ready(60), e.error
        assert e.pipeline("img2img").unet is e.model.pipe.unet
        assert e.pipeline("inpaint").text_encoder_2 is e.model.pipe.text_encoder_2
        out = e.submit(I2I, "x", "fog", [1], image=picture(1)).future.result(60)
        src = inpaint_source(picture(2), square_mask(), 64, 64, blur=0)
        inpainted = e.submit(INPAINT, "x", "", [2], image=src.image, mask=src.mask).future.result(60)
        assert out[0].image.size == inpainted[0].image.size == (64, 64)
        kept = np.asarray(src.paste_back(inpainted[0].image))
        assert (kept[:24] == np.asarray(picture(2))[:24]).all()
    finally:
        e.drain(30)


def test_line_wrapped_base64_decodes_as_a1111_takes_it():
    import base64

    from sdserve.inputs import b64_bytes

    raw = bytes(range(256)) * 40
    assert b64_bytes(base64.encodebytes(raw).decode(), "init_images.0") == raw  # wrapped at 76
    assert b64_bytes("data:image/png;base64," + base64.b64encode(raw).decode(), "image") == raw


def test_jpeg_and_webp_carry_a_long_infotext_cut_to_what_exif_holds():
    import io

    from sdserve.images import encode

    long = "a castle " * 5000  # 45,000 characters: 90 kB of UTF-16, past JPEG's 64 KiB EXIF segment
    for fmt in ("jpeg", "webp"):
        out = Image.open(io.BytesIO(encode(Image.new("RGB", (8, 8)), long, fmt, 90)))
        comment = out.getexif().get_ifd(0x8769)[0x9286]
        assert out.format == fmt.upper() and comment.startswith(b"UNICODE\0" + "a castle".encode("utf-16-be"))
        assert len(comment) <= 8 + 60_000
