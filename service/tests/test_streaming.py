"""Streamed generations and edits (stream: true) with the official openai client's iterator:
previews from the latents mid-run, then each image, in OpenAI's event shapes."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from conftest import SIZE
from PIL import Image

from sdserve.engine import partial_steps


@pytest.fixture(scope="module")
def client(shared_server):
    return openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused-on-loopback", max_retries=0)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_partial_steps_spread_and_never_the_last():
    assert partial_steps(3, 8) == [2, 4, 6]
    assert partial_steps(2, 6) == [2, 4]
    assert partial_steps(3, 3) == [1, 2]  # fewer previews than asked when the steps are few
    assert partial_steps(0, 10) == [] and partial_steps(3, 1) == []


def test_streamed_generation_with_the_openai_client(client):
    body = {"prompt": "a boat", "size": SIZE, "extra_body": {"seed": 21, "steps": 8}}
    events = list(client.images.generate(**body, stream=True, partial_images=3))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    previews = [decode(e.b64_json) for e in events[:3]]
    assert all(p.size == (64, 64) for p in previews)
    assert len({p.tobytes() for p in previews}) == 3  # each a different moment of the run
    done = events[-1]
    assert done.output_format == "png" and done.size == "64x64" and done.usage.total_tokens == 0
    # The completed image is the one the same request gives unstreamed.
    plain = client.images.generate(**body)
    assert done.b64_json == plain.data[0].b64_json


def test_stream_without_previews_and_in_another_format(client):
    events = list(client.images.generate(prompt="x", size=SIZE, stream=True, output_format="jpeg", n=2,
                                         extra_body={"steps": 3}))  # fmt: skip
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert decode(events[0].b64_json).format == "JPEG"


def test_streamed_edit_keeps_the_original_outside_the_mask(client):
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    files = []
    for image in (source, mask):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        files.append(buf.getvalue())
    events = list(client.images.edit(image=("in.png", files[0], "image/png"), mask=("m.png", files[1], "image/png"),
                                     prompt="x", stream=True, partial_images=1, extra_body={"steps": 4, "seed": 2}))  # fmt: skip
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    got, orig = np.asarray(decode(events[-1].b64_json).convert("RGB")), np.asarray(source)
    keep = np.ones((64, 64), bool)
    keep[16:48, 16:48] = False
    assert (got[keep] == orig[keep]).all() and (got[~keep] != orig[~keep]).any()


def test_a_failure_after_the_start_is_an_error_event_and_before_it_a_status(shared_server):
    """A full queue refuses before the stream begins (429); a generation that fails once it has
    begun arrives as an `error` event, which the openai client raises."""
    engine = shared_server.engine
    url, body = shared_server.url + "/v1/images/generations", {"prompt": "x", "size": SIZE, "stream": True}
    size = engine.settings.queue_size
    try:
        engine.settings.queue_size = 0
        assert httpx.post(url, json=body).status_code == 429
    finally:
        engine.settings.queue_size = size

    def fail(batch: int) -> None:
        raise RuntimeError("the pipeline broke")

    engine.before_pipeline_call = fail
    try:
        with httpx.stream("POST", url, json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = r.read().decode()
        c = openai.OpenAI(base_url=shared_server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="generation failed"):
            list(c.images.generate(prompt="x", size=SIZE, stream=True))
    finally:
        engine.before_pipeline_call = None
    name, data = text.strip().split("\n")
    assert (
        name == "event: error" and json.loads(data[len("data: ") :])["error"]["code"] == "generation_failed"
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": True, "response_format": "url"}, "response_format"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_stream_refusals_name_the_field(shared_server, body, param):
    r = httpx.post(shared_server.url + "/v1/images/generations", json={"prompt": "x", "size": SIZE, **body})
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_jobs_are_not_streamed(shared_server):
    r = httpx.post(shared_server.url + "/v1/jobs", json={"prompt": "x", "size": SIZE, "stream": True})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stream"


def test_a_client_gone_mid_stream_cancels_its_request(shared_server):
    import socket

    from conftest import Gate, wait_until

    engine = shared_server.engine
    gate = Gate()
    engine.before_pipeline_call = gate
    try:
        body = json.dumps({"prompt": "x", "size": SIZE, "stream": True, "partial_images": 1}).encode()
        sock = socket.create_connection(("127.0.0.1", shared_server.port))
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        assert gate.entered.wait(30)
        running = list(engine._running)
        assert len(running) == 1 and not running[0].cancelled
        sock.close()
        wait_until(lambda: running[0].cancelled, what="the request cancelled")
    finally:
        gate.open()
        engine.before_pipeline_call = None
