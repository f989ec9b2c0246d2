"""OpenAI Images API over real HTTP, with the official openai client unchanged."""

from __future__ import annotations

import base64
import io
import json
import os

import httpx
import openai
import pytest
from conftest import FAST, SIZE, wait_until
from PIL import Image


@pytest.fixture(scope="module")
def client(shared_server):
    return openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused-on-loopback", max_retries=0)


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def test_generate_with_the_openai_client(client):
    result = client.images.generate(
        prompt="a lighthouse at dusk",
        n=2,
        size=SIZE,
        response_format="b64_json",
        extra_body={"seed": 42, "steps": 3},
    )
    assert len(result.data) == 2
    images = [decode(d.b64_json) for d in result.data]
    assert all(im.size == (64, 64) and im.format == "PNG" for im in images)
    # A1111-style parameters chunk with each image's own seed (s, s+1).
    assert "Seed: 42," in images[0].text["parameters"] and "Seed: 43," in images[1].text["parameters"]
    assert (
        images[0]
        .text["parameters"]
        .startswith("a lighthouse at dusk\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras")
    )
    assert [d.model_extra["seed"] for d in result.data] == [42, 43]
    assert result.created > 0


def test_same_seed_same_image_and_random_seed_reported(client):
    body = {"prompt": "a boat", "size": SIZE, "response_format": "b64_json"}
    a = client.images.generate(**body, extra_body={"seed": 9, "steps": 3, "scheduler": "Euler a"})
    b = client.images.generate(**body, extra_body={"seed": 9, "steps": 3, "scheduler": "Euler a"})
    assert a.data[0].b64_json == b.data[0].b64_json
    r = client.images.generate(**body, extra_body={"seed": -1, "steps": 3})
    seed = r.data[0].model_extra["seed"]
    assert 0 <= seed < 2**32 and f"Seed: {seed}," in decode(r.data[0].b64_json).text["parameters"]


def test_negative_prompt_changes_the_image(client):
    body = {"prompt": "a boat", "size": SIZE, "response_format": "b64_json"}
    plain = client.images.generate(**body, extra_body={"seed": 3, "steps": 3})
    negative = client.images.generate(
        **body, extra_body={"seed": 3, "steps": 3, "negative_prompt": "the sea"}
    )
    assert plain.data[0].b64_json != negative.data[0].b64_json
    assert "Negative prompt: the sea" in decode(negative.data[0].b64_json).text["parameters"]


def test_url_response_served_from_output_dir(client, shared_server):
    r = client.images.generate(prompt="a tree", size=SIZE, response_format="url", extra_body={"steps": 3})
    url = r.data[0].url
    assert url.startswith(shared_server.url + "/v1/images/files/")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    assert httpx.get(shared_server.url + "/v1/images/files/..%2Fsecret.png").status_code == 404


def test_url_images_expire_after_the_output_retention(live, tmp_path):
    """Past OUTPUT_RETENTION_S a URL answers 404 at once and the sweep deletes the file; younger
    images stay. The clock is not waited on: files are aged by their modification time."""
    server = live(output_dir=tmp_path, output_retention_s=3, warmup_sizes=SIZE)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0)
    old, young = (
        c.images.generate(prompt=p, size=SIZE, response_format="url", extra_body=FAST).data[0].url
        for p in ("old", "young")
    )
    assert httpx.get(old).status_code == 200
    old_file = tmp_path / old.rsplit("/", 1)[1]
    aged = old_file.stat().st_mtime - 60
    os.utime(old_file, (aged, aged))
    half_written = tmp_path / "img-crashed.part"
    half_written.write_bytes(b"x")
    os.utime(half_written, (aged, aged))
    gone = httpx.get(old)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    wait_until(lambda: not old_file.exists() and not half_written.exists(), timeout=30, what="the sweep")
    assert httpx.get(young).status_code == 200


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_format_and_compression(client, fmt):
    """The image comes back in the format asked, the response says which, the quality follows
    output_compression, and the parameters travel in EXIF as A1111 writes them."""
    body = {
        "prompt": "a boat",
        "size": SIZE,
        "response_format": "b64_json",
        "extra_body": {"seed": 4, "steps": 3},
    }
    best = client.images.generate(**body, output_format=fmt)
    small = client.images.generate(**body, output_format=fmt, output_compression=5)
    assert best.output_format == fmt and small.output_format == fmt
    image = decode(best.data[0].b64_json)
    assert image.format == {"jpeg": "JPEG", "webp": "WEBP"}[fmt] and image.size == (64, 64)
    comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0") and "Seed: 4," in comment[8:].decode("utf-16-be")
    assert len(small.data[0].b64_json) < len(best.data[0].b64_json)
    png = client.images.generate(**body)
    assert png.output_format == "png" and decode(png.data[0].b64_json).format == "PNG"


def test_output_format_as_a_url(client):
    r = client.images.generate(prompt="a tree", size=SIZE, response_format="url", output_format="webp",
                               extra_body={"steps": 3})  # fmt: skip
    assert r.data[0].url.endswith(".webp") and r.output_format == "webp"
    got = httpx.get(r.data[0].url)
    assert (
        got.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(got.content)).format == "WEBP"
    )


def test_models_lists_the_loaded_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-sd"]
    assert client.models.retrieve("tiny-sd").id == "tiny-sd"


def test_errors_have_openai_shape_and_name_the_field(client):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="x", size="65x64")
    err = e.value.body
    assert (
        err["param"] == "size"
        and "multiple of 8" in err["message"]
        and err["type"] == "invalid_request_error"
    )
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="x", size=SIZE, extra_body={"scheduler": "Warp drive"})
    assert (
        e.value.body["param"] == "scheduler"
        and "DPM++ 2M" in e.value.body["message"]
        and "Karras" in e.value.body["message"]
    )
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="x", model="dall-e-3", size=SIZE)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 5}, "n"),  # above max_images=4 of this server
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 151}, "steps"),
        ({"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
        ({"prompt": "x", "style": "vivid"}, "style"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "x", "scheduler": "Euler a Karras"}, "scheduler"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "output_format": "webp", "output_compression": -1}, "output_compression"),
        ({"prompt": "x", "output_compression": 50}, "output_compression"),  # png has no quality
    ],
)
def test_validation_422_names_the_field(shared_server, body, param):
    r = httpx.post(shared_server.url + "/v1/images/generations", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"]


def test_pixel_budget(make_settings, live):
    server = live(max_pixels=3 * 64 * 64, max_images=8)
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", "n": 4, **FAST})
    assert r.status_code == 422 and "budget" in r.json()["error"]["message"]


def test_malformed_json_is_400(shared_server):
    r = httpx.post(
        shared_server.url + "/v1/images/generations",
        content=b'{"prompt": "x",',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(shared_server.url + "/v1/images/generations", content=b"prompt=x")
    assert r.status_code == 400


def test_body_size_limit_413(shared_server):
    big = b'{"prompt": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    r = httpx.post(
        shared_server.url + "/v1/images/generations",
        content=big,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "SDSERVE_MAX_BODY_BYTES" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the streamed body is counted as it arrives
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(
        shared_server.url + "/v1/images/generations",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def test_unknown_route_and_method(shared_server):
    assert httpx.get(shared_server.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    assert httpx.get(shared_server.url + "/v1/images/generations").status_code == 405


def test_openapi_schema(shared_server):
    paths = httpx.get(shared_server.url + "/openapi.json").json()["paths"]
    for p in (
        "/v1/images/generations",
        "/v1/models",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/livez",
        "/readyz",
        "/metrics",
    ):
        assert p in paths


def test_request_id_echoed(shared_server):
    r = httpx.get(shared_server.url + "/readyz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(shared_server.url + "/readyz").headers["x-request-id"]) == 32


def test_the_safety_checkers_verdict_reaches_the_response(live, tiny_model_with_checker):
    """Where the model's checker runs, each image says what it decided (it blacks flagged images
    out); without a checker the field is absent rather than a false "safe"."""
    server = live(model=tiny_model_with_checker, safety_checker=True)
    body = {"prompt": "x", **FAST, "n": 2}
    data = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60).json()["data"]
    assert [item["nsfw"] for item in data] == [True, True]
    r = httpx.post(
        server.url + "/sdapi/v1/txt2img",
        json={"prompt": "x", "width": 64, "height": 64, "steps": 2},
        timeout=60,
    )
    assert json.loads(r.json()["info"])["nsfw_content_detected"] == [True]
    unchecked = live()
    data = httpx.post(unchecked.url + "/v1/images/generations", json=body, timeout=60).json()["data"]
    assert all("nsfw" not in item for item in data)


def test_refusals_name_the_deployments_variable_too(live):
    """A deploy tool passes SETTING_HINTS; refusals that name a setting name its variable as well."""
    server = live(
        setting_hints="output_dir=sd_service_image_retention_minutes,max_body_bytes=sd_service_settings.max_body_bytes"
    )
    r = httpx.post(
        server.url + "/v1/images/generations", json={"prompt": "x", "response_format": "url", **FAST}
    )
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == "response_format"
    assert "SDSERVE_OUTPUT_DIR, set by sd_service_image_retention_minutes" in err["message"], err
    r = httpx.post(
        server.url + "/sdapi/v1/txt2img",
        json={"prompt": "x", "save_images": True, "width": 64, "height": 64, "steps": 3},
    )
    assert r.status_code == 422 and "set by sd_service_image_retention_minutes" in r.json()["detail"]
    big = b'{"prompt": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    r = httpx.post(
        server.url + "/v1/images/generations", content=big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert "SDSERVE_MAX_BODY_BYTES, set by sd_service_settings.max_body_bytes" in r.json()["error"]["message"]


def test_a_hint_for_no_setting_is_refused_at_start(make_settings):
    with pytest.raises(ValueError, match="'outputdir' is no setting"):
        make_settings(setting_hints="outputdir=sd_service_image_retention_minutes")
