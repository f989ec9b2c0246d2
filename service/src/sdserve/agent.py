"""HAProxy's agent check (AGENT_PORT): each TCP connection gets one line, then is closed.

- `down`: the engine is not ready (loading, warming up, failed): HAProxy marks the server down.
- `up 0%`: the service is draining (SIGTERM), or its queue is full (a new request would get 429):
  HAProxy sends it no new work and lets what is in flight finish.
- `up 100%`: otherwise.

Never `ready`, `drain` or `maint`: those are HAProxy's admin states, which belong to the operator
and the rolling deploy; an agent's `ready` would cancel an operator's drain. What HAProxy sends
(`agent-send`) is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from .app import StartupRefused
from .engine import EngineState
from .service import Service

DOWN = "down\n"
NO_NEW_WORK = "up 0%\n"
FULL_WEIGHT = "up 100%\n"


def agent_line(service: Service) -> str:
    """The line HAProxy gets now. Read without locks: each value is one attribute read."""
    engine = service.engine
    if engine.state == EngineState.FAILED:
        return DOWN
    if service.draining or engine.state in (EngineState.DRAINING, EngineState.STOPPED):
        return NO_NEW_WORK
    if not engine.ready:
        return DOWN
    if engine.queue_full:
        return NO_NEW_WORK
    return FULL_WEIGHT


class _AgentProtocol(asyncio.Protocol):
    """Answers on connect and closes; the transport sends the line without blocking the loop, and a
    client that has reset only makes its write fail, which the transport drops quietly."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(agent_line(self.service).encode("ascii"))  # type: ignore[attr-defined]
        transport.close()


@contextlib.asynccontextmanager
async def agent_listener(service: Service, host: str) -> AsyncIterator[asyncio.AbstractServer | None]:
    """Listen on `host`:AGENT_PORT for as long as the context lasts (nothing when it is 0). A port
    that cannot be had refuses start-up (StartupRefused), naming the setting."""
    port = service.settings.agent_port
    if not port:
        yield None
        return
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(lambda: _AgentProtocol(service), host, port)
    except OSError as e:
        raise StartupRefused(
            f"cannot listen for HAProxy's agent check on {host}:{port} "
            f"({service.settings.name('agent_port')}): {os.strerror(e.errno) if e.errno else e}"
        ) from None
    try:
        yield server
    finally:
        server.close()
