"""HAProxy's agent check (AGENT_PORT) over real TCP against a started service: one line a
connection, then the close; `down`, `up 0%` or `up 100%` as the service's state says."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import struct
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from conftest import FAST, Gate, free_port, wait_until
from pydantic import ValidationError

from sdserve.agent import agent_line
from sdserve.engine import EngineState
from sdserve.settings import Settings


def ask(server, port: int | None = None) -> str:
    """What one agent check reads: everything until the service closes the connection."""
    port = port or server.app.state.service.settings.agent_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b""
        while chunk := s.recv(64):
            data += chunk
    return data.decode("ascii")


def gen(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"prompt": "x", **FAST, **body}, timeout=120)


@pytest.fixture
def agent_live(live):
    """live(), with the agent check on a port of its own."""
    return lambda **kw: live(agent_port=free_port(), **kw)


def test_ready_is_up_100(agent_live):
    server = agent_live()
    assert ask(server) == "up 100%\n"  # one line, then closed (ask reads to the end)
    assert ask(server) == "up 100%\n"  # and again: one connection, one answer


def test_off_by_default(live):
    assert live().app.state.service.settings.agent_port == 0


def test_down_while_warming_up_then_up(agent_live):
    gate = Gate()
    server = agent_live(
        wait_ready=False, before_start=lambda s: setattr(s.engine, "before_pipeline_call", gate)
    )
    assert gate.entered.wait(60)  # held inside the warm-up generation
    assert ask(server) == "down\n"
    gate.open()
    assert server.engine.wait_ready(60)
    assert ask(server) == "up 100%\n"


def test_down_after_a_failed_start_up(agent_live, tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    server = agent_live(wait_ready=False, model=tmp_path)
    server.engine.wait_ready(60)
    assert server.engine.state == "failed"
    assert ask(server) == "down\n"


def test_full_queue_is_up_0_while_a_request_would_get_429(agent_live):
    gate = Gate()
    server = agent_live(queue_size=2)
    server.engine.before_pipeline_call = gate
    with cf.ThreadPoolExecutor(3) as pool:
        running = pool.submit(gen, server.url)
        assert gate.entered.wait(60)
        first = pool.submit(gen, server.url, seed=1)
        wait_until(lambda: server.engine.queue_depth == 1, what="one queued")
        assert ask(server) == "up 100%\n"  # room for one more
        second = pool.submit(gen, server.url, seed=2)
        wait_until(lambda: server.engine.queue_depth == 2, what="two queued")
        assert ask(server) == "up 0%\n"
        assert gen(server.url).status_code == 429  # what the agent said: no room
        gate.open()
        assert [f.result().status_code for f in (running, first, second)] == [200, 200, 200]
    assert ask(server) == "up 100%\n"


def test_draining_is_up_0_until_the_service_stops(agent_live):
    """The shutdown SIGTERM starts (uvicorn's should_exit): the agent answers `up 0%` while work in
    flight finishes, and stops listening once the service has stopped."""
    gate = Gate()
    server = agent_live()
    port = server.app.state.service.settings.agent_port
    server.engine.before_pipeline_call = gate
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(gen, server.url)
        assert gate.entered.wait(60)
        server.server.should_exit = True  # what uvicorn's SIGTERM handler does
        wait_until(lambda: server.app.state.service.draining, what="the drain to begin")
        assert ask(server) == "up 0%\n"
        assert ask(server) == "up 0%\n"  # still: the request is held in the worker
        gate.open()
        assert running.result().status_code == 200
    server.thread.join(60)
    assert not server.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        ask(server, port)


def reset(port: int, send: bytes = b"") -> None:
    """Connect and reset (RST, not FIN): SO_LINGER with a zero timeout, then close."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if send:
        s.sendall(send)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_clients_that_reset_or_never_read_harm_nothing(agent_live, caplog):
    server = agent_live()
    port = server.app.state.service.settings.agent_port
    caplog.set_level(logging.WARNING)
    for i in range(50):
        reset(port, send=b"agent-send text\n" if i % 2 else b"")
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]  # never read
    try:
        assert ask(server) == "up 100%\n"
        assert httpx.get(server.url + "/readyz").status_code == 200
        assert gen(server.url).status_code == 200
    finally:
        for s in idle:
            s.close()
    assert ask(server) == "up 100%\n"
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors]


def test_a_port_in_use_refuses_start_up_naming_the_setting(tiny_model, tmp_path):
    """`sdserve serve` exits 2 before it loads the model, and says which setting to change."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
        env["SDSERVE_AGENT_PORT"] = str(port)
        cmd = [sys.executable, "-m", "sdserve", "serve", "--model", str(tiny_model)]
        cmd += ["--port", str(free_port()), "--cache-dir", str(tmp_path / "cache"), "--warmup-sizes", "64x64"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr
    assert "SDSERVE_AGENT_PORT" in done.stderr and f"127.0.0.1:{port}" in done.stderr
    assert "address already in use" in done.stderr.lower()
    assert "warm-up" not in done.stdout + done.stderr  # refused before the model was loaded


def test_the_agent_port_must_differ_from_the_http_port(make_settings):
    with pytest.raises(ValidationError, match="agent_port"):
        make_settings(port=7000, agent_port=7000)
    assert Settings(agent_port=7100).agent_port == 7100


def fake(state: EngineState, *, draining: bool = False, full: bool = False):
    engine = SimpleNamespace(state=state, ready=state == EngineState.READY, queue_full=full)
    return SimpleNamespace(engine=engine, draining=draining)


@pytest.mark.parametrize(
    ("state", "draining", "full", "line"),
    [
        (EngineState.CREATED, False, False, "down\n"),
        (EngineState.LOADING, False, False, "down\n"),
        (EngineState.WARMING, False, False, "down\n"),
        (EngineState.FAILED, False, False, "down\n"),
        (EngineState.FAILED, True, False, "down\n"),  # a failed service stops: never up again
        (EngineState.READY, False, False, "up 100%\n"),
        (EngineState.READY, False, True, "up 0%\n"),
        (EngineState.READY, True, False, "up 0%\n"),  # SIGTERM came; the engine has not heard yet
        (EngineState.DRAINING, False, False, "up 0%\n"),
        (EngineState.STOPPED, True, False, "up 0%\n"),  # the worker is done, connections still close
    ],
)
def test_the_line_for_each_state(state, draining, full, line):
    assert agent_line(fake(state, draining=draining, full=full)) == line
    assert line.split()[0] in ("up", "down")  # never ready, drain or maint (the operator's)
