"""A real `sdserve serve` process: SIGHUP re-reads keys; SIGTERM drains in-flight work and exits 0."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until

from sdserve.keys import key_line

ALICE = "alice-key-0123456789abcdef01234567"
BOB = "bob-key-0123456789abcdef0123456789"


def serve(tiny_model, tmp_path: Path, *options: str):
    """A ready `sdserve serve` process with alice's key; (process, url, key file, log path)."""
    keys = tmp_path / "api-keys"
    keys.write_text(key_line(ALICE, "alice") + "\n")
    port = free_port()
    log = (tmp_path / "stdout.log").open("w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    env.update(
        SDSERVE_API_KEYS_FILE=str(keys), SDSERVE_TORCH_THREADS="1"
    )  # settings from the environment, as under systemd
    cmd = [sys.executable, "-m", "sdserve", "serve", "--model", str(tiny_model), "--port", str(port)]
    cmd += [
        "--warmup-sizes",
        "64x64",
        "--warmup-steps",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        *options,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, Path(log.name).read_text()
        try:
            return httpx.get(url + "/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout=120, what="sdserve ready")
    return proc, url, keys, log.name


@pytest.fixture(scope="module")
def process(tiny_model, tmp_path_factory):
    """One process for the module (starting one costs seconds): the SIGTERM test runs last."""
    proc, url, keys, log = serve(tiny_model, tmp_path_factory.mktemp("proc"))
    yield proc, url, keys, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def log_lines(logfile: str) -> list[dict]:
    text = Path(logfile).read_text()
    complete = text[: text.rfind("\n") + 1]  # a line still being written is read next time
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def models(url: str, key: str) -> int:
    return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_sighup_rotates_keys_without_restart(process):
    proc, url, keys, _ = process
    assert models(url, ALICE) == 200 and models(url, BOB) == 401
    keys.write_text(key_line(BOB, "bob") + "\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: models(url, BOB) == 200, what="bob's key accepted after SIGHUP")
    assert models(url, ALICE) == 401
    assert proc.poll() is None


def test_an_emptied_key_file_keeps_the_keys_in_force(process):
    proc, url, keys, logfile = process
    keys.write_text("# all keys removed by mistake\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: any(e["msg"].startswith("key file not reloaded") for e in log_lines(logfile)),
        what="the refused reload logged",
    )
    refused = [e for e in log_lines(logfile) if e["msg"].startswith("key file not reloaded")]
    assert refused[-1]["level"] == "error" and "refusing to serve without keys" in refused[-1]["msg"]
    assert models(url, BOB) == 200  # bob's key is in force since the rotation test
    for route in ("/v1/models", "/metrics"):
        assert httpx.get(url + route).status_code == 401
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {BOB}"}).text
    assert "sdserve_api_keys_file_stale 1.0" in metrics


def test_logs_are_json_lines_without_prompts(process):
    _, url, _, logfile = process  # bob's key is in force since the SIGHUP test
    body = {"prompt": "zebra-secret-prompt", "size": "64x64", "steps": 1}
    r = httpx.post(
        url + "/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {BOB}", "X-Request-ID": "req-42"},
    )
    assert r.status_code == 200

    def logged() -> list[dict]:
        return [e for e in log_lines(logfile) if e.get("request_id") == "req-42"]

    # The access line is written once the response has gone out, so it may trail the client.
    wanted = {"generation requested", "POST /v1/images/generations 200"}
    wait_until(lambda: {e["msg"] for e in logged()} >= wanted, timeout=30, what=f"log lines {wanted}")
    ours = logged()
    assert all(e["key"] == "bob" for e in ours if "key" in e)
    assert "zebra-secret-prompt" not in Path(logfile).read_text()


def test_no_prompt_text_in_library_log_lines(process):
    """diffusers quotes the part of a prompt past CLIP's 77 tokens in a warning: not in our logs."""
    _, url, _, logfile = process  # bob's key is in force since the SIGHUP test
    body = {"prompt": "word " * 90 + "okapi-marker-tail", "size": "64x64", "steps": 1}
    r = httpx.post(url + "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {BOB}"})
    assert r.status_code == 200

    def warned() -> list[dict]:
        return [e for e in log_lines(logfile) if "truncated" in e["msg"]]

    # The library's warning itself is logged (so the marker would have reached the log), cut back.
    wait_until(lambda: warned(), timeout=30, what="diffusers' truncation warning")
    assert all("not logged" in e["msg"] for e in warned())
    assert "okapi-marker-tail" not in Path(logfile).read_text()


def test_sigterm_drains_in_flight_work_and_exits_zero(process):
    proc, url, keys, logfile = process
    keys.write_text(key_line(ALICE, "alice") + "\n")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: models(url, ALICE) == 200, what="alice's key back")
    headers = {"Authorization": f"Bearer {ALICE}"}

    def generate(seed: int, steps: int) -> httpx.Response:
        body = {"prompt": "x", "size": "64x64", "steps": steps, "seed": seed}
        return httpx.post(url + "/v1/images/generations", json=body, headers=headers, timeout=300)

    def progress() -> dict:
        return httpx.get(url + "/sdapi/v1/progress", headers=headers).json()

    with cf.ThreadPoolExecutor(3) as pool:
        running = pool.submit(generate, 1, 150)
        wait_until(lambda: progress()["state"]["sampling_step"] >= 1, what="first request running")
        queued = [pool.submit(generate, s, 20) for s in (2, 3)]
        wait_until(lambda: progress()["state"]["job_count"] >= 2, what="more work queued")
        proc.send_signal(signal.SIGTERM)
        responses = [f.result() for f in (running, *queued)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert proc.wait(120) == 0
    out = Path(logfile).read_text()
    assert "Waiting for connections to close" in out  # requests were in flight when SIGTERM came
    assert "drained cleanly: True" in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/livez")


def test_a_drain_past_its_timeout_answers_503_and_exits_zero(tiny_model, tmp_path):
    """DRAIN_TIMEOUT_S 2 with far longer work: every client gets 503 with Retry-After, the batch
    stops at its next step, and the process exits 0 soon after the timeout."""
    # 2,000 steps: about 15 s a request on a 2-core machine, far past the 2 s drain.
    proc, url, _, logfile = serve(tiny_model, tmp_path, "--drain-timeout-s", "2", "--max-steps", "2000")
    headers = {"Authorization": f"Bearer {ALICE}"}

    def generate(seed: int) -> httpx.Response:
        body = {"prompt": "x", "size": "64x64", "steps": 2000, "seed": seed}
        return httpx.post(url + "/v1/images/generations", json=body, headers=headers, timeout=300)

    def progress() -> dict:
        return httpx.get(url + "/sdapi/v1/progress", headers=headers).json()

    try:
        with cf.ThreadPoolExecutor(4) as pool:
            running = pool.submit(generate, 1)
            wait_until(lambda: progress()["state"]["sampling_step"] >= 1, what="first request running")
            queued = [pool.submit(generate, s) for s in (2, 3, 4)]
            wait_until(lambda: progress()["state"]["job_count"] >= 4, what="more work queued")
            assert progress()["state"]["sampling_step"] < 1000  # far from done when the drain ends
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in (running, *queued)]
        assert [r.status_code for r in responses] == [503] * 4, [r.text for r in responses]
        assert all(
            r.headers["retry-after"] and r.json()["error"]["code"] == "shutting_down" for r in responses
        )
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 2 + 20  # the drain timeout plus the stop grace
        assert "drained cleanly: False" in Path(logfile).read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
