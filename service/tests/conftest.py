"""Shared fixtures: the tiny model (built once per session), settings, and live servers
(uvicorn on a free loopback port in a thread, so tests reach the app over real HTTP)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

for _name in [n for n in os.environ if n.startswith("SDSERVE_")]:
    del os.environ[_name]  # the developer's own settings must not leak into tests
# One torch thread: the tiny model gains nothing from more, and on a shared 2-core
# machine OpenMP threads spinning against other work make it many times slower.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

from sdserve.app import create_app  # noqa: E402
from sdserve.server import build_server  # noqa: E402
from sdserve.settings import Settings  # noqa: E402

SIZE = "64x64"
FAST = {"size": SIZE, "steps": 3}  # generation body fields that keep tests quick


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sdserve.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_model_with_checker(tmp_path_factory) -> Path:
    """The tiny model with a tiny safety checker that flags every image."""
    from sdserve.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-sd-checked", safety_checker=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_settings(tiny_model, cache_dir):
    def make(**overrides) -> Settings:
        base = dict(model=tiny_model, cache_dir=cache_dir, warmup_sizes=SIZE, warmup_steps=1, default_steps=3)
        base.update(overrides)
        return Settings(**base)

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int) -> None:
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        # The server `sdserve serve` runs, with its read deadlines and drain on shutdown.
        self.server = build_server(
            app, app.state.service.settings, host="127.0.0.1", port=port, log_level="warning"
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def engine(self):
        return self.app.state.service.engine

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread died at start-up")
            time.sleep(0.02)
        if wait_ready:
            assert self.engine.wait_ready(120), self.engine.error
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def metric(self, name: str, headers: dict | None = None) -> float:
        """Sum of a metric's samples (all label sets), read over HTTP."""
        text = httpx.get(self.url + "/metrics", headers=headers or {}).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def live(make_settings):
    """Factory: live(**settings) -> a started LiveServer; all are stopped at teardown."""
    servers: list[LiveServer] = []

    def start(wait_ready: bool = True, before_start=None, **overrides) -> LiveServer:
        app = create_app(make_settings(**overrides))
        server = LiveServer(app, free_port())
        if before_start:
            before_start(server)
        servers.append(server)
        return server.start(wait_ready)

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def shared_server(tiny_model, tmp_path_factory):
    """One open (no keys) server for the read-mostly contract tests of a module."""
    out = tmp_path_factory.mktemp("out")
    settings = Settings(
        model=tiny_model,
        cache_dir=tmp_path_factory.mktemp("c"),
        warmup_sizes=SIZE,
        warmup_steps=1,
        default_steps=3,
        output_dir=out,
        max_images=4,
    )
    server = LiveServer(create_app(settings), free_port()).start()
    yield server
    server.stop()


class Gate:
    """Holds the engine's worker inside `before_pipeline_call` until opened (test hook)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def __call__(self, batch: int) -> None:
        self.calls.append(batch)
        self.entered.set()
        assert self.release.wait(60), "gate never opened"

    def open(self) -> None:
        self.release.set()


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll for a state change (not a timing assertion: the timeout only guards against hangs)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
