"""Hostile input and faults: a key-file mistake never opens the service, one request can fail only
itself, no input yields a 500, and slow or greedy clients cannot hold others up."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time

import httpx
import pytest
from conftest import FAST, SIZE, Gate, wait_until

from sdserve.engine import InputFailed
from sdserve.generation import make_spec
from sdserve.keys import key_line

ALICE = "alice-0123456789abcdef0123456789ab"
BOB = "bob-0123456789abcdef0123456789abcd"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def post(url: str, path: str, body, headers: dict | None = None, **kwargs) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(url + path, content=raw, headers=headers, timeout=120, **kwargs)


@pytest.fixture
def two_keys(tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"{key_line(ALICE, 'alice')}\n{key_line(BOB, 'bob')}\n")
    return path


# keys ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# every key removed\n\n# nothing left\n"])
def test_a_reload_that_would_leave_no_keys_keeps_the_keys_in_force(live, two_keys, text, caplog):
    server = live(api_keys_file=two_keys)
    keys = server.app.state.service.keys
    two_keys.write_text(text)
    with caplog.at_level("ERROR", logger="sdserve.keys"):
        assert keys.reload() is False
    assert any("refusing to serve without keys" in r.getMessage() for r in caplog.records)
    for route in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + route).status_code == 401, route
    assert post(server.url, "/v1/images/generations", {"prompt": "x", **FAST}).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=bearer(ALICE)).status_code == 200
    assert server.metric("sdserve_api_keys_file_stale", bearer(ALICE)) == 1
    assert server.metric('sdserve_api_key_reloads_total{result="kept_old_keys"}', bearer(ALICE)) == 1
    # A good file clears the mark.
    two_keys.write_text(key_line(BOB, "bob") + "\n")
    assert keys.reload() is True
    assert httpx.get(server.url + "/v1/models", headers=bearer(ALICE)).status_code == 401
    assert server.metric("sdserve_api_keys_file_stale", bearer(BOB)) == 0
    assert server.metric("sdserve_api_keys", bearer(BOB)) == 1


# isolation -------------------------------------------------------------------------------------
def test_a_request_that_fails_its_batch_fails_only_itself(live):
    """A poison request (a lone surrogate, let in past validation here on purpose) shares a batch
    with two valid ones: the batch fails, each request is run alone, and only the poison fails."""
    server = live(max_batch=8)
    engine, settings = server.engine, server.app.state.service.settings
    gate = Gate()
    engine.before_pipeline_call = gate
    params = make_spec(settings, prompt="", negative_prompt="", width=64, height=64, n=1, steps=2,
                       guidance=None, sampler=None).params  # fmt: skip
    first = engine.submit(params, "holds the worker", "", [1])
    assert gate.entered.wait(30)
    mates = [
        engine.submit(params, p, "", [s])
        for p, s in (("valid one", 2), ("bad \ud800 one", 3), ("valid two", 4))
    ]
    gate.open()
    assert first.future.result(60)
    good, poison, good2 = (r.future for r in mates)
    assert len(good.result(60)) == 1 and len(good2.result(60)) == 1
    with pytest.raises(InputFailed) as e:
        poison.result(60)
    assert e.value.status == 422 and "\ud800" not in str(e.value)
    assert gate.calls == [1, 3, 1, 1, 1]  # the batch of three, then each alone
    engine.before_pipeline_call = None


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/images/generations", "prompt"),
        ("/v1/images/generations", "negative_prompt"),
        ("/v1/images/generations", "user"),
        ("/v1/jobs", "negative_prompt"),
        ("/sdapi/v1/txt2img", "prompt"),
        ("/sdapi/v1/txt2img", "negative_prompt"),
        ("/sdapi/v1/txt2img", "comments"),
    ],
)
def test_a_lone_surrogate_is_422_naming_the_field(shared_server, path, field):
    value = {"note": "\ud800"} if field == "comments" else "a \ud800 b"
    body = (
        {"prompt": "x", "width": 64, "height": 64, "steps": 2} if "sdapi" in path else {"prompt": "x", **FAST}
    )
    r = post(shared_server.url, path, {**body, field: value})  # json.dumps escapes it as \ud800
    assert r.status_code == 422, r.text
    err = r.json()["error"] if path.startswith("/v1/") else r.json()
    assert err["param"].startswith(field) and "surrogate" in (err.get("message") or err.get("detail"))
    # The service is still serving everyone else.
    assert post(shared_server.url, "/v1/images/generations", {"prompt": "x", **FAST}).status_code == 200


# no 500 from any input -------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["denoising_strength", "hr_scale", "subseed"])
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e309"])
def test_non_finite_numbers_in_ignored_a1111_fields_are_422(shared_server, field, number):
    raw = f'{{"prompt": "x", "width": 64, "height": 64, "steps": 2, "{field}": {number}}}'.encode()
    r = post(shared_server.url, "/sdapi/v1/txt2img", raw)
    assert r.status_code == 422, r.text
    assert r.json()["param"] == field


def test_lcm_above_its_step_limit_is_422_naming_steps(shared_server):
    r = post(
        shared_server.url,
        "/v1/images/generations",
        {"prompt": "x", "size": SIZE, "steps": 51, "scheduler": "LCM"},
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "steps", r.text
    r = post(
        shared_server.url,
        "/sdapi/v1/txt2img",
        {"prompt": "x", "width": 64, "height": 64, "steps": 51, "sampler_name": "LCM"},
    )
    assert r.status_code == 422 and r.json()["param"] == "steps", r.text


def test_only_names_the_service_gave_are_served_as_images(shared_server):
    out = shared_server.app.state.service.settings.output_dir
    url = post(
        shared_server.url, "/v1/images/generations", {"prompt": "x", "response_format": "url", **FAST}
    ).json()["data"][0]["url"]
    name = url.rsplit("/", 1)[1]
    assert httpx.get(shared_server.url + "/v1/images/files/" + name).status_code == 200  # control
    for planted in ("notours.png", ".hidden.png", "img-1-0123456789abcdef.png.png"):
        (out / planted).write_bytes(b"\x89PNG planted")
    for odd in ("notours.png", ".hidden.png", "img-1-0123456789abcdef.png.png", "x" * 300 + ".png", "%2e%2e%2fetc.png",
                name.replace(".png", ".part"), name.upper()):  # fmt: skip
        r = httpx.get(shared_server.url + "/v1/images/files/" + odd)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (odd, r.text)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/images/generations", {"prompt": "x", "size": "６４x６４"}, "size"),  # fullwidth digits
        ("/v1/images/generations", {"prompt": "x", "size": "٦٤x٦٤"}, "size"),  # Arabic-Indic digits
        ("/v1/images/generations", {"prompt": "x", "size": SIZE, "steps": True}, "steps"),
        ("/v1/images/generations", {"prompt": "x", "size": SIZE, "seed": True}, "seed"),
        ("/v1/images/generations", {"prompt": "x", "size": SIZE, "n": "1"}, "n"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": True}, "steps"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "seed": True}, "seed"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "send_images": 1}, "send_images"),
    ],
)
def test_lax_input_is_refused(shared_server, path, body, param):
    r = post(shared_server.url, path, body)
    assert r.status_code == 422, r.text
    err = r.json()["error"] if path.startswith("/v1/") else r.json()
    assert err["param"] == param


def test_an_integral_float_is_an_integer(shared_server):
    r = post(
        shared_server.url, "/v1/images/generations", {"prompt": "x", "size": SIZE, "steps": 2.0, "seed": 7.0}
    )
    assert r.status_code == 200 and r.json()["data"][0]["seed"] == 7, r.text


def test_a1111_errors_have_one_shape(shared_server):
    for body in (
        {"prompt": "x", "width": "wide"},
        {"prompt": "x", "width": 64, "height": 64, "enable_hr": True},
    ):
        r = post(shared_server.url, "/sdapi/v1/txt2img", body)
        assert r.status_code == 422 and set(r.json()) == {"error", "detail", "param", "errors"}, r.text
    r = httpx.get(shared_server.url + "/sdapi/v1/nothing")
    assert r.status_code == 404 and set(r.json()) == {"error", "detail", "param", "errors"}


# fairness and slow clients -----------------------------------------------------------------------
def test_one_key_cannot_fill_the_queue_for_the_others(live, two_keys):
    server = live(api_keys_file=two_keys, queue_size=4, max_batch=1)  # a share of 2 each
    gate = Gate()
    server.engine.before_pipeline_call = gate
    body = {"prompt": "x", **FAST}
    with cf.ThreadPoolExecutor(8) as pool:
        running = pool.submit(post, server.url, "/v1/images/generations", body, bearer(ALICE))
        assert gate.entered.wait(30)
        waiting = [
            pool.submit(post, server.url, "/v1/images/generations", body, bearer(ALICE)) for _ in range(2)
        ]
        wait_until(lambda: server.engine.queue_depth == 2, what="alice's two requests queued")
        over = post(server.url, "/v1/images/generations", body, bearer(ALICE))
        assert over.status_code == 429 and over.json()["error"]["code"] == "key_queue_full"
        assert "SDSERVE_MAX_QUEUED_PER_KEY" in over.json()["error"]["message"] and over.headers["retry-after"]
        bobs = pool.submit(post, server.url, "/v1/images/generations", body, bearer(BOB))
        wait_until(lambda: server.engine.queue_depth == 3, what="bob's request queued")
        gate.open()
        assert [f.result().status_code for f in (running, *waiting, bobs)] == [200, 200, 200, 200]
    server.engine.before_pipeline_call = None


def test_one_key_cannot_hold_every_job(live, two_keys):
    server = live(api_keys_file=two_keys, max_jobs=4)  # a share of 2 each
    gate = Gate()
    server.engine.before_pipeline_call = gate
    body = {"prompt": "x", **FAST}
    ids = [post(server.url, "/v1/jobs", body, bearer(ALICE)).json()["id"] for _ in range(2)]
    over = post(server.url, "/v1/jobs", body, bearer(ALICE))
    assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_jobs_for_key"
    assert "SDSERVE_MAX_JOBS_PER_KEY" in over.json()["error"]["message"]
    assert post(server.url, "/v1/jobs", body, bearer(BOB)).status_code == 202
    gate.open()
    for job_id in ids:
        wait_until(
            lambda j=job_id: (
                httpx.get(f"{server.url}/v1/jobs/{j}", headers=bearer(ALICE)).json()["status"] == "succeeded"
            )
        )
    server.engine.before_pipeline_call = None


def test_one_key_alone_may_use_the_whole_queue(live, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text(key_line(ALICE, "alice") + "\n")
    server = live(api_keys_file=keys, queue_size=4, max_batch=1)
    gate = Gate()
    server.engine.before_pipeline_call = gate
    body = {"prompt": "x", **FAST}
    with cf.ThreadPoolExecutor(8) as pool:
        running = pool.submit(post, server.url, "/v1/images/generations", body, bearer(ALICE))
        assert gate.entered.wait(30)
        waiting = [
            pool.submit(post, server.url, "/v1/images/generations", body, bearer(ALICE)) for _ in range(4)
        ]
        wait_until(lambda: server.engine.queue_depth == 4, what="four requests queued")
        gate.open()
        assert {f.result().status_code for f in (running, *waiting)} == {200}
    server.engine.before_pipeline_call = None


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_headers_are_cut_off(live):
    server = live(read_timeout_s=1)
    with _connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert _closed(sock) == b""
        assert time.monotonic() - started < 25  # closed by the deadline, not by this test's timeout
    with _connect(server) as sock:  # control: a whole request in time is answered
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _closed(sock).startswith(b"HTTP/1.1 200")


def test_a_slow_body_is_408(live):
    server = live(read_timeout_s=1)
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
        answer = _closed(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"SDSERVE_READ_TIMEOUT_S" in answer


# url results ------------------------------------------------------------------------------------------
def _url_of(server, headers: dict) -> str:
    r = post(server.url, "/v1/images/generations", {"prompt": "x", "response_format": "url", **FAST}, headers)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["url"]


def test_url_results_never_take_the_clients_host(live, tmp_path):
    server = live(output_dir=tmp_path / "out")
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    url = _url_of(server, forged)
    assert url.startswith(f"http://127.0.0.1:{server.port}/v1/images/files/"), url
    assert httpx.get(url).status_code == 200


def test_url_results_from_a_trusted_proxy_or_public_url(live, tmp_path):
    proxied = live(output_dir=tmp_path / "a", trusted_proxies="127.0.0.0/8")
    forwarded = {"X-Forwarded-Host": "images.example:8443", "X-Forwarded-Proto": "https"}
    assert _url_of(proxied, forwarded).startswith("https://images.example:8443/v1/images/files/")
    bad = {"X-Forwarded-Host": "evil.example/@x", "X-Forwarded-Proto": "gopher"}
    assert _url_of(proxied, bad).startswith(f"http://127.0.0.1:{proxied.port}/")
    public = live(output_dir=tmp_path / "b", public_url="https://sd.example/")
    assert _url_of(public, forwarded).startswith("https://sd.example/v1/images/files/")


# jobs -----------------------------------------------------------------------------------------------------
def test_deleting_a_job_removes_it_and_a_cancelled_job_is_not_done(live):
    server = live()
    gate = Gate()
    server.engine.before_pipeline_call = gate
    body = {"prompt": "x", **FAST}
    holder = post(server.url, "/v1/jobs", body).json()["id"]
    assert gate.entered.wait(30)
    queued = post(server.url, "/v1/jobs", body).json()["id"]
    ended = httpx.delete(f"{server.url}/v1/jobs/{queued}").json()
    assert ended["status"] == "cancelled" and ended["progress"]["fraction"] < 1, ended
    assert httpx.get(f"{server.url}/v1/jobs/{queued}").status_code == 404
    assert httpx.delete(f"{server.url}/v1/jobs/{queued}").status_code == 404
    gate.open()
    wait_until(lambda: httpx.get(f"{server.url}/v1/jobs/{holder}").json()["status"] == "succeeded")
    assert httpx.delete(f"{server.url}/v1/jobs/{holder}").json()["status"] == "succeeded"
    assert httpx.get(f"{server.url}/v1/jobs/{holder}").status_code == 404
    server.engine.before_pipeline_call = None


# the OpenAPI document ---------------------------------------------------------------------------------------
def test_the_openapi_document_tells_the_truth(shared_server):
    doc = httpx.get(shared_server.url + "/openapi.json").json()
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text  # FastAPI's 422 shape is not ours
    gen = doc["paths"]["/v1/images/generations"]["post"]["responses"]
    assert {"400", "401", "404", "408", "413", "422", "429", "500", "503", "504"} <= set(gen)
    assert gen["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    a1111 = doc["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]
    assert a1111["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/A1111Error")
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "422" not in doc["paths"]["/v1/jobs/{job_id}"]["delete"]["responses"]  # nothing to validate
    assert "422" in doc["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]  # ?partial_image=maybe
    # This instance's limits: max_images=4 in the shared server, the default MAX_SIDE 2048.
    openai = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert openai["n"]["maximum"] == 4
    width = doc["components"]["schemas"]["Txt2ImgRequest"]["properties"]["width"]["anyOf"][0]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 2048, 8)
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic"}


def test_405_names_every_method_of_the_path(shared_server):
    r = httpx.put(shared_server.url + "/v1/jobs/x")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
