"""Health, readiness, metrics, auth, queue limits, batching, OOM and timeouts over real HTTP."""

from __future__ import annotations

import base64
import concurrent.futures as cf

import httpx
import openai
import pytest
import torch
from conftest import FAST, Gate, wait_until

from sdserve.keys import key_line

KEY = "k-0123456789abcdef0123456789abcdef"
OTHER = "k-fedcba9876543210fedcba9876543210"


def gen(url: str, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(
        url + "/v1/images/generations",
        json={"prompt": "x", **FAST, **body},
        headers=headers or {},
        timeout=120,
    )


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"# team keys\n{key_line(KEY, 'alice')}\n\n")
    return path


def test_readiness_before_and_after_warm_up(live):
    gate = Gate()
    server = live(wait_ready=False, before_start=lambda s: setattr(s.engine, "before_pipeline_call", gate))
    gate.entered.wait(60)  # held inside the warm-up generation
    assert httpx.get(server.url + "/livez").status_code == 200
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 503 and r.json()["status"] == "warming" and r.headers["retry-after"]
    assert gen(server.url).status_code == 503  # not ready: refused, not queued
    gate.open()
    assert server.engine.wait_ready(60)
    server.engine.before_pipeline_call = None
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    assert gen(server.url).status_code == 200


def test_failed_start_up_is_not_live(live, tmp_path):
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    server = live(wait_ready=False, model=tmp_path)
    server.engine.wait_ready(60)
    assert server.engine.state == "failed" and "unet/ is missing" in server.engine.error
    assert httpx.get(server.url + "/livez").status_code == 503
    assert httpx.get(server.url + "/readyz").status_code == 503


def test_safety_checker_setting_needs_a_model_that_ships_one(live):
    server = live(wait_ready=False, safety_checker=True)
    server.engine.wait_ready(60)
    assert server.engine.state == "failed" and "SDSERVE_SAFETY_CHECKER" in server.engine.error


def test_auth_bearer_basic_none_wrong(live, keyfile):
    server = live(api_keys_file=keyfile)
    assert gen(server.url, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    assert gen(server.url, {"Authorization": f"Basic {basic}"}).status_code == 200
    for headers in (
        {},
        {"Authorization": f"Bearer {OTHER}"},
        {"Authorization": "Basic !!!"},
        {"Authorization": f"Token {KEY}"},
    ):
        r = gen(server.url, headers)
        assert r.status_code == 401, headers
        assert "Bearer" in r.headers["www-authenticate"] and "Basic" in r.headers["www-authenticate"]
        assert r.json()["error"]["type"] == "authentication_error"
    # The openai client sends its api_key as a Bearer token.
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.models.list().data[0].id == "tiny-sd"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=OTHER, max_retries=0).models.list()
    # Health needs no key; metrics do, and count requests by key name (never the key).
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 401
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'key="alice"' in text and KEY not in text


# Health, the API's description, and kept images (their unguessable names are the credential).
OPEN_ROUTES = {"/livez", "/readyz", "/healthz", "/openapi.json", "/docs", "/redoc", "/v1/images/files/{name}"}


def test_every_route_but_health_wants_the_key(live, keyfile):
    """Over the OpenAPI document, so a new route without the key check fails here: each operation,
    called without a key and with a body it cannot use (an empty JSON object: not a form, no prompt),
    answers 401, not 400 or 422. (Unparsable JSON is refused before any check, within the body limit.)"""
    server = live(api_keys_file=keyfile)
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    checked = []
    for path, ops in paths.items():
        if path in OPEN_ROUTES:
            continue
        for method in ops:
            url = server.url + path.replace("{job_id}", "job-1-00").replace("{name}", "x.png")
            r = httpx.request(method, url, content=b"{}", headers={"content-type": "application/json"})
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
            checked.append(f"{method} {path}")
    assert {"post /v1/images/edits", "post /sdapi/v1/img2img", "post /sdapi/v1/interrupt"} <= set(checked)


def test_without_a_key_the_image_routes_take_only_the_small_body(live, keyfile):
    """The image routes' larger limit is for callers with a key: a keyless 2 MB body is refused
    before it is read, as on any other route; with the key it gets through to the route."""
    server = live(api_keys_file=keyfile, max_body_bytes=1024 * 1024)
    big = b"x" * (2 * 1024 * 1024)
    multipart = {"content-type": "multipart/form-data; boundary=b"}
    keyless = httpx.post(server.url + "/v1/images/edits", content=big, headers=multipart)
    assert keyless.status_code == 413 and "SDSERVE_MAX_BODY_BYTES" in keyless.text, keyless.text
    keyed = httpx.post(
        server.url + "/v1/images/edits", content=big, headers={**multipart, "Authorization": f"Bearer {KEY}"}
    )
    assert keyed.status_code == 400 and keyed.json()["error"]["code"] == "invalid_form", keyed.text


def test_key_file_reload(live, keyfile):
    server = live(api_keys_file=keyfile)
    keys = server.app.state.service.keys
    assert gen(server.url, {"Authorization": f"Bearer {OTHER}"}).status_code == 401
    keyfile.write_text(f"{key_line(OTHER, 'bob')}\n")
    assert keys.reload()  # what SIGHUP runs (the signal itself: test_process.py)
    assert gen(server.url, {"Authorization": f"Bearer {OTHER}"}).status_code == 200
    assert gen(server.url, {"Authorization": f"Bearer {KEY}"}).status_code == 401
    keyfile.write_text("not a key line\n")
    assert not keys.reload()  # a broken file keeps the keys in force
    assert gen(server.url, {"Authorization": f"Bearer {OTHER}"}).status_code == 200


def test_metrics_public_setting(live, keyfile):
    server = live(api_keys_file=keyfile, metrics_public=True)
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert gen(server.url).status_code == 401


def test_metrics_after_generation(live):
    server = live()
    assert gen(server.url, n=2).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'sdserve_requests_total{key="open",method="POST",route="/v1/images/generations",status="200"} 1.0',
        'sdserve_images_total{key="open"} 2.0',
        "sdserve_queue_depth 0.0",
        "sdserve_batch_size_count 1.0",
        "sdserve_queue_seconds_count 1.0",
        "sdserve_generation_seconds_count 1.0",
        "sdserve_ready 1.0",
        "sdserve_steps_per_second",
    ):
        assert name in text, name


def test_full_queue_answers_429_with_retry_after(live):
    gate = Gate()
    server = live(queue_size=2)
    server.engine.before_pipeline_call = gate
    with cf.ThreadPoolExecutor(4) as pool:
        running = pool.submit(gen, server.url)
        gate.entered.wait(60)
        queued = [pool.submit(gen, server.url, seed=i) for i in range(2)]
        wait_until(lambda: server.engine.queue_depth == 2, what="two queued")
        r = gen(server.url)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        gate.open()
        assert [f.result().status_code for f in (running, *queued)] == [200, 200, 200]
    assert server.metric("sdserve_rejected_total") == 1
    assert server.metric("sdserve_queue_limit") == 2  # saturation: sdserve_queue_depth / this


def test_batching_under_concurrent_load_keeps_per_seed_images(live):
    gate = Gate()
    server = live(max_batch=8)
    seeds = [101, 102, 103, 104]
    alone = {s: gen(server.url, seed=s).json()["data"][0]["b64_json"] for s in seeds[:1]}
    server.engine.before_pipeline_call = gate
    with cf.ThreadPoolExecutor(6) as pool:
        first = pool.submit(gen, server.url, seed=1)
        gate.entered.wait(60)
        futures = {
            s: pool.submit(gen, server.url, seed=s, prompt=f"prompt {s}" if s != 101 else "x") for s in seeds
        }
        wait_until(lambda: server.engine.queue_depth == 4, what="four queued")
        gate.open()
        results = {s: f.result().json()["data"][0]["b64_json"] for s, f in futures.items()}
        first.result()
    assert gate.calls == [1, 4]
    text = httpx.get(server.url + "/metrics").text
    assert (
        'sdserve_batch_size_bucket{le="4.0"} 3.0' in text
        and 'sdserve_batch_size_bucket{le="2.0"} 2.0' in text
    )
    # Seed 101 with the same prompt, alone vs. in a batch of four: equal within rounding.
    import io

    import numpy as np
    from PIL import Image

    def px(b64):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float64)

    assert np.abs(px(alone[101]) - px(results[101])).mean() < 1.0


def test_injected_out_of_memory_is_503_then_next_request_served(live):
    server = live()

    def oom(n):
        raise torch.OutOfMemoryError("CUDA out of memory (injected by test)")

    server.engine.before_pipeline_call = oom
    r = gen(server.url)
    assert r.status_code == 503
    err = r.json()["error"]
    assert (
        err["code"] == "out_of_memory"
        and "out of GPU memory" in err["message"]
        and err["type"] == "server_error"
    )
    server.engine.before_pipeline_call = None
    assert gen(server.url).status_code == 200
    assert server.metric("sdserve_out_of_memory_total") == 1


def test_request_timeout_answers_504_and_frees_the_slot(live):
    gate = Gate()
    server = live(request_timeout_s=0.5)
    server.engine.before_pipeline_call = gate
    r = gen(server.url)  # held in the worker past the timeout
    assert r.status_code == 504 and "SDSERVE_REQUEST_TIMEOUT_S" in r.json()["error"]["message"]
    gate.open()
    wait_until(lambda: not server.engine.busy, what="worker idle")
    server.engine.before_pipeline_call = None
    assert gen(server.url).status_code == 200


def test_client_disconnect_cancels_a_queued_request(live):
    gate = Gate()
    server = live()
    server.engine.before_pipeline_call = gate
    with cf.ThreadPoolExecutor(2) as pool:
        running = pool.submit(gen, server.url)
        gate.entered.wait(60)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/images/generations",
                json={"prompt": "gone", **FAST},
                timeout=httpx.Timeout(5, read=0.5),
            )
        wait_until(lambda: server.engine.queue_depth == 0, what="the abandoned request to leave the queue")
        gate.open()
        assert running.result().status_code == 200
    assert gate.calls == [1]  # the abandoned request never ran
