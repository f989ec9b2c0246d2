"""A real `sdserve serve` process: SIGHUP re-reads keys; SIGTERM drains in-flight work and exits 0."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until

from sdserve.keys import key_line

ALICE = "alice-key-0123456789abcdef01234567"
BOB = "bob-key-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def process(tiny_model, tmp_path_factory):
    """One process for the module (starting one costs seconds): the SIGTERM test runs last."""
    tmp_path = tmp_path_factory.mktemp("proc")
    keys = tmp_path / "api-keys"
    keys.write_text(key_line(ALICE, "alice") + "\n")
    port = free_port()
    log = (tmp_path / "stdout.log").open("w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    env.update(
        SDSERVE_API_KEYS_FILE=str(keys), SDSERVE_TORCH_THREADS="1"
    )  # settings from the environment, as under systemd
    cmd = [sys.executable, "-m", "sdserve", "serve", "--model", str(tiny_model), "--port", str(port)]
    cmd += ["--warmup-sizes", "64x64", "--warmup-steps", "1", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, Path(log.name).read_text()
        try:
            return httpx.get(url + "/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout=120, what="sdserve ready")
    yield proc, url, keys, log.name
    if proc.poll() is None:
        proc.kill()
        proc.wait()


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
        text = Path(logfile).read_text()
        complete = text[: text.rfind("\n") + 1]  # a line still being written is read next time
        lines = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return [e for e in lines if e.get("request_id") == "req-42"]

    # The access line is written once the response has gone out, so it may trail the client.
    wanted = {"generation requested", "POST /v1/images/generations 200"}
    wait_until(lambda: {e["msg"] for e in logged()} >= wanted, timeout=30, what=f"log lines {wanted}")
    ours = logged()
    assert all(e["key"] == "bob" for e in ours if "key" in e)
    assert "zebra-secret-prompt" not in Path(logfile).read_text()


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
