"""OpenAI image edits over real HTTP with the official client: multipart image and mask, the
transparent area edited and every other pixel kept, whole-image edits, and refusals naming the field."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from conftest import SIZE
from PIL import Image


@pytest.fixture(scope="module")
def client(shared_server):
    return openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused-on-loopback", max_retries=0)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def noise(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def hole(size=(64, 64), box=(16, 20, 40, 44)) -> Image.Image:
    """OpenAI's mask: opaque, with a fully transparent box (the area to edit)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def inside(box=(16, 20, 40, 44), size=(64, 64)) -> np.ndarray:
    sel = np.zeros((size[1], size[0]), bool)
    sel[box[1] : box[3], box[0] : box[2]] = True
    return sel


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_edit_with_a_mask_keeps_every_pixel_outside_it(client):
    source = noise(1)
    result = client.images.edit(
        image=("in.png", png(source), "image/png"),
        mask=("mask.png", png(hole()), "image/png"),
        prompt="a window",
        n=2,
        extra_body={"seed": 11, "steps": 3},
    )
    assert [d.model_extra["seed"] for d in result.data] == [11, 12] and result.size == "64x64"
    orig, box = np.asarray(source), inside()
    for d in result.data:
        got = np.asarray(decode(d.b64_json).convert("RGB"))
        assert (got[~box] == orig[~box]).all()
        assert (got[box] != orig[box]).any()
    assert "Denoising strength: 1" in decode(result.data[0].b64_json).text["parameters"]


def test_the_images_own_transparency_is_the_mask_without_one(client):
    source = noise(2).convert("RGBA")
    source.paste((0, 0, 0, 0), (16, 20, 40, 44))
    result = client.images.edit(
        image=("in.png", png(source), "image/png"), prompt="x", extra_body={"seed": 1, "steps": 3}
    )
    got, orig, box = (
        np.asarray(decode(result.data[0].b64_json).convert("RGB")),
        np.asarray(source.convert("RGB")),
        inside(),
    )
    assert (got[~box] == orig[~box]).all() and (got[box] != orig[box]).any()


def test_edit_without_mask_is_image_to_image(client):
    source = noise(3)
    body = {"prompt": "x", "size": SIZE, "extra_body": {"seed": 4, "steps": 4, "strength": 0.5}}
    a = client.images.edit(image=("in.jpg", png(source, "JPEG"), "image/jpeg"), **body)
    b = client.images.edit(image=("in.jpg", png(noise(4), "JPEG"), "image/jpeg"), **body)
    assert a.data[0].b64_json != b.data[0].b64_json
    px = [np.asarray(im, dtype=float) for im in (decode(a.data[0].b64_json), source, noise(4))]
    assert np.abs(px[0] - px[1]).mean() < np.abs(px[0] - px[2]).mean()


def test_edit_output_format_and_size(client):
    r = client.images.edit(image=("in.png", png(noise(5, (80, 72))), "image/png"), prompt="x", size="64x64",
                           output_format="webp", output_compression=50, extra_body={"steps": 2})  # fmt: skip
    assert r.output_format == "webp" and decode(r.data[0].b64_json).format == "WEBP"
    assert decode(r.data[0].b64_json).size == (64, 64)
    # No size: the image's own, rounded down to multiples of 8.
    r = client.images.edit(
        image=("in.png", png(noise(5, (83, 70))), "image/png"), prompt="x", extra_body={"steps": 2}
    )
    assert decode(r.data[0].b64_json).size == (80, 64)


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        ({"image": b"not an image"}, {}, "image"),
        ({"image": "gif"}, {}, "image"),
        ({"image": "big"}, {}, "image"),
        ({"image": "ok", "mask": "small"}, {}, "mask"),
        ({"image": "ok", "mask": "opaque"}, {}, "mask"),
        ({"image": "ok", "mask": b"\x89PNG broken"}, {}, "mask"),
        ({"mask": "ok"}, {}, "image"),  # no image
        ({"image": "ok"}, {"prompt": ""}, "prompt"),
        ({"image": "ok"}, {"n": "many"}, "n"),
        ({"image": "ok"}, {"size": "65x64"}, "size"),
        ({"image": "ok"}, {"strength": "0"}, "strength"),
        ({"image": "ok"}, {"strength": "0.1", "steps": "3"}, "strength"),
        ({"image": "ok"}, {"output_format": "gif"}, "output_format"),
        ({"image": "ok"}, {"stream": "true", "partial_images": "4"}, "partial_images"),
        ({"image": "ok"}, {"style": "vivid"}, "style"),
        ({"image": "ok"}, {"model": "dall-e-2"}, "model"),
    ],
)
def test_edit_refusals_name_the_field(shared_server, files, data, param):
    made = {
        "ok": png(noise(1)),
        "gif": png(noise(1), "GIF"),
        "big": png(Image.new("RGB", (2100, 2100))),
        "small": png(hole((32, 32), (0, 0, 8, 8))),
        "opaque": png(Image.new("RGBA", (64, 64), (0, 0, 0, 255))),
    }
    files = {
        k: (f"{k}.png", made.get(v, v) if isinstance(v, str) else v, "image/png") for k, v in files.items()
    }
    r = httpx.post(
        shared_server.url + "/v1/images/edits", files=files, data={"prompt": "x", "steps": "2", **data}
    )
    assert r.status_code in (404, 422), r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_edit_body_must_be_multipart(shared_server):
    r = httpx.post(shared_server.url + "/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_form"
    r = httpx.post(
        shared_server.url + "/v1/images/edits",
        content=b"--b\r\nno headers end",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 400


def test_multipart_parts_round_trip_any_bytes():
    from sdserve.api.forms import parse
    from sdserve.errors import Problem

    data = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n\r\n"
    req = httpx.Request("POST", "http://x", files={"image[]": ("a b.png", data)}, data={"prompt": "é"})
    parts = parse(req.headers["content-type"], req.read())
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("prompt", None, "é".encode()),
        ("image[]", "a b.png", data),
    ]
    for broken in (req.read()[:-10], req.read().replace(b"Content-Disposition", b"X-Other")):
        with pytest.raises(Problem):
            parse(req.headers["content-type"], broken)


def test_the_openapi_document_describes_the_new_routes(shared_server):
    doc = httpx.get(shared_server.url + "/openapi.json").json()
    paths = doc["paths"]
    for p in (
        "/v1/images/edits",
        "/sdapi/v1/img2img",
        "/sdapi/v1/png-info",
        "/sdapi/v1/interrupt",
        "/sdapi/v1/skip",
    ):
        assert p in paths, p
    form = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "strength", "stream", "partial_images"} <= set(form["properties"])
    assert form["properties"]["image"]["format"] == "binary" and form["required"] == ["image", "prompt"]
    for p in ("/v1/images/generations", "/v1/images/edits"):
        assert "text/event-stream" in paths[p]["post"]["responses"]["200"]["content"]
    img2img = doc["components"]["schemas"]["Img2ImgRequest"]["properties"]
    width = img2img["width"]["anyOf"][0]
    assert (width["maximum"], width["multipleOf"]) == (2048, 8)  # this instance's limits, as txt2img's
    assert img2img["resize_mode"]["enum"] == [0, 1, 2] and img2img["inpainting_fill"]["enum"] == [0, 1]
    assert img2img["latent_mask"]["enum"] == [None, ""]
    openai_props = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert openai_props["output_format"]["anyOf"][0]["enum"] == ["png", "jpeg", "webp"]


def test_an_edit_as_a_job_gives_the_synchronous_body_and_frees_its_images(shared_server):
    from conftest import wait_until

    url = shared_server.url
    files = {"image": ("in.png", png(noise(7)), "image/png"), "mask": ("m.png", png(hole()), "image/png")}
    data = {"prompt": "a window", "seed": "31", "steps": "3"}
    r = httpx.post(url + "/v1/images/edits/jobs", files=files, data=data)
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}", r.text
    job_id = r.json()["id"]
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "succeeded", what="the job")
    job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    sync = httpx.post(url + "/v1/images/edits", files=files, data=data, timeout=60).json()
    assert job["result"]["data"][0]["b64_json"] == sync["data"][0]["b64_json"]
    held = shared_server.app.state.service.jobs.jobs[job_id].req
    assert held.image is None and held.mask is None  # done: the job keeps only its result
    refused = httpx.post(url + "/v1/images/edits/jobs", files=files, data={**data, "stream": "true"})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "stream"
    bad = httpx.post(
        url + "/v1/images/edits/jobs", files={"image": ("x.png", b"nope", "image/png")}, data=data
    )
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "image"
