"""Async jobs: 202 with an id, progress, the synchronous body when done, expiry, owner-only access."""

from __future__ import annotations

import httpx
from conftest import FAST, SIZE, Gate, wait_until

from sdserve.keys import key_line

ALICE = "alice-key-0123456789abcdef01234567"
BOB = "bob-key-0123456789abcdef0123456789"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def poll(url: str, job_id: str, headers: dict | None = None) -> dict:
    state = {}

    def done() -> bool:
        state.update(httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers or {}).json())
        return state["status"] in ("succeeded", "failed", "cancelled")

    wait_until(done, what=f"job {job_id}")
    return state


def test_job_result_equals_synchronous_response(live):
    server = live()
    body = {"prompt": "a harbour", "n": 2, "seed": 21, **FAST}
    r = httpx.post(server.url + "/v1/jobs", json=body)
    assert r.status_code == 202
    job = r.json()
    assert (
        job["status"] in ("queued", "running", "succeeded")
        and r.headers["location"] == f"/v1/jobs/{job['id']}"
    )
    final = poll(server.url, job["id"])
    assert (
        final["status"] == "succeeded"
        and final["progress"]["images_done"] == 2
        and final["progress"]["fraction"] == 1
    )
    sync = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60).json()
    assert [d["b64_json"] for d in final["result"]["data"]] == [d["b64_json"] for d in sync["data"]]
    assert [d["seed"] for d in final["result"]["data"]] == [21, 22]


def test_job_progress_while_running(live):
    gate = Gate()
    server = live()
    server.engine.before_pipeline_call = gate
    job = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", **FAST}).json()
    gate.entered.wait(30)
    view = httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()
    assert view["status"] == "running" and view["progress"]["steps"] == 3 and view["progress"]["step"] == 0
    second = httpx.post(server.url + "/v1/jobs", json={"prompt": "y", **FAST}).json()
    assert httpx.get(f"{server.url}/v1/jobs/{second['id']}").json()["status"] == "queued"
    cancelled = httpx.delete(f"{server.url}/v1/jobs/{second['id']}").json()
    assert cancelled["status"] == "cancelled"
    gate.open()
    assert poll(server.url, job["id"])["status"] == "succeeded"
    assert gate.calls == [1]


def test_job_validation_and_queue_full(live):
    gate = Gate()
    server = live(queue_size=1)
    r = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", "size": "63x64"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "size"
    server.engine.before_pipeline_call = gate
    first = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", **FAST}).json()
    gate.entered.wait(30)
    httpx.post(server.url + "/v1/jobs", json={"prompt": "x", **FAST})
    r = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", **FAST})
    assert r.status_code == 429 and r.headers["retry-after"]
    gate.open()
    assert poll(server.url, first["id"])["status"] == "succeeded"


def test_finished_jobs_expire(live):
    server = live(job_ttl_s=0.05)
    job = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", **FAST}).json()
    store = server.app.state.service.jobs
    wait_until(lambda: store.jobs[job["id"]].finished_at is not None, what="job finished")
    wait_until(lambda: httpx.get(f"{server.url}/v1/jobs/{job['id']}").status_code == 404, what="job expired")
    r = httpx.get(f"{server.url}/v1/jobs/{job['id']}")
    assert r.json()["error"]["code"] == "not_found" and "kept" in r.json()["error"]["message"]


def test_jobs_belong_to_their_key(live, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{key_line(ALICE, 'alice')}\n{key_line(BOB, 'bob')}\n")
    server = live(api_keys_file=keys)
    job = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", **FAST}, headers=bearer(ALICE)).json()
    assert poll(server.url, job["id"], bearer(ALICE))["status"] == "succeeded"
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=bearer(BOB)).status_code == 404
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}").status_code == 401


def test_a_running_jobs_progress_shows_its_newest_preview_when_asked(live, monkeypatch):
    """The worker is held right after it hands the job a preview; meanwhile GET shows that preview
    (with ?partial_image=true only), and the finished job no longer holds it."""
    import base64
    import io
    import threading

    from PIL import Image

    from sdserve.jobs import Job

    reached, release = threading.Event(), threading.Event()
    keep, calls = Job.keep_partial, []

    def held(self, image, index, picture):
        keep(self, image, index, picture)
        calls.append(index)
        if index == 0:
            reached.set()
            release.wait(30)

    monkeypatch.setattr(Job, "keep_partial", held)
    server = live()
    body = {"prompt": "x", "size": SIZE, "steps": 8, "seed": 3, "partial_images": 2}
    job = httpx.post(server.url + "/v1/jobs", json=body).json()
    try:
        assert reached.wait(30)
        url = f"{server.url}/v1/jobs/{job['id']}"
        plain = httpx.get(url).json()
        assert plain["status"] == "running" and "partial_image" not in plain["progress"]
        shown = httpx.get(url, params={"partial_image": "true"}).json()["progress"]
        assert shown["step"] < 8 and shown["partial_image"]["partial_image_index"] == 0
        assert shown["partial_image"]["image_index"] == 0
        image = Image.open(io.BytesIO(base64.b64decode(shown["partial_image"]["b64_json"])))
        assert (image.format, image.size) == ("PNG", (64, 64))
    finally:
        release.set()
    final = poll(server.url, job["id"])
    assert final["status"] == "succeeded" and calls == [0, 1]
    after = httpx.get(f"{server.url}/v1/jobs/{job['id']}", params={"partial_image": "true"}).json()
    assert "partial_image" not in after["progress"]
    # Without partial_images the engine makes no previews for a job.
    bare = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", **FAST}).json()
    assert poll(server.url, bare["id"])["status"] == "succeeded" and calls == [0, 1]
