"""The HTTP server around the app: uvicorn, with the limits a public service needs.

- A connection must deliver each request's headers within READ_TIMEOUT_S of opening, or of its
  previous response; uvicorn alone would wait for ever (a slow-headers client holds a connection).
  The body's own deadline is the app's (408).
- An idle keep-alive connection closes after IDLE_TIMEOUT_S.
- SIGTERM begins the service's drain at once, while uvicorn stops accepting and waits for the
  connections in flight, so that the drain timeout counts from the signal.
- With AGENT_PORT, HAProxy's agent check (agent.py) listens on the same host, in the same event loop,
  from before the app starts (the model is not loaded when its port is taken) until the connections
  are done, so that the gateway hears `up 0%` for the whole drain.
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .agent import agent_listener
from .settings import Settings

# Most seconds a stop takes past DRAIN_TIMEOUT_S; systemd's TimeoutStopSec is the drain plus this.
STOP_GRACE_S = 20


def header_deadline_protocol(base: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """`base` (uvicorn's h11 or httptools protocol), closing connections whose next request's
    headers are not complete `seconds` after the connection opened or the last response ended."""

    class HeaderDeadline(base):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _waiting_after = None  # the request cycle the deadline waits to see replaced

        def connection_made(self, transport):  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):  # type: ignore[override]
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._waiting_after = self.cycle
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            # A new request's headers replace the cycle; the same one means none came in time.
            if self.cycle is self._waiting_after and not self.transport.is_closing():
                self.transport.close()

    HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


class Server(uvicorn.Server):
    """uvicorn's server; its shutdown starts the service's drain before waiting for connections."""

    async def serve(self, sockets=None) -> None:
        async with agent_listener(self.config.app.state.service, self.config.host):
            await super().serve(sockets)

    async def shutdown(self, sockets=None) -> None:
        self.config.app.state.service.drain()
        await super().shutdown(sockets)


def build_server(app, settings: Settings, **config) -> Server:
    """The server `sdserve serve` runs (the tests run the same)."""
    # Past the drain: the worker's last step (Engine.drain's grace), rendering what finished, closing.
    grace = STOP_GRACE_S
    config = {
        "host": settings.host,
        "port": settings.port,
        "lifespan": "on",
        "http": header_deadline_protocol(AutoHTTPProtocol, settings.read_timeout_s),
        "timeout_keep_alive": settings.idle_timeout_s,
        "timeout_graceful_shutdown": settings.drain_timeout_s + grace,
        "server_header": False,
        "proxy_headers": False,  # forwarded headers count only from TRUSTED_PROXIES (Service.public_base)
        **config,
    }
    return Server(uvicorn.Config(app, **config))
