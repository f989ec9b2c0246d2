"""What the routes share: settings, engine, keys, jobs, and the wait for a generation."""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Security
from fastapi.openapi.models import HTTPBase, HTTPBearer
from fastapi.security.base import SecurityBase

from .engine import Engine, EngineError, GenParams, GenRequest, pick_seed
from .keys import KeyStore
from .metrics import Metrics
from .settings import Settings
from .validation import Problem

log = logging.getLogger("sdserve.service")


@dataclass
class Service:
    settings: Settings
    engine: Engine
    keys: KeyStore
    metrics: Metrics
    png_pool: ThreadPoolExecutor
    jobs: Any = None
    _drain: asyncio.Future | None = field(default=None, repr=False)

    @property
    def model_id(self) -> str:
        if self.engine.model is not None:
            return self.engine.model.model_id
        return self.settings.model_id or (self.settings.model.resolve().name if self.settings.model else "")

    @property
    def native_size(self) -> tuple[int, int]:
        """The model's own size, for requests that give none (512x512 until a model is loaded)."""
        return self.engine.model.native_size if self.engine.model else (512, 512)

    def engine_problem(self, e: EngineError) -> Problem:
        headers = (
            {"Retry-After": "1"} if e.status in (429,) else ({"Retry-After": "5"} if e.status == 503 else {})
        )
        return Problem(str(e), None, status=e.status, code=e.code, headers=headers)

    def submit(
        self,
        params: GenParams,
        prompt: str,
        negative: str,
        n: int,
        seed: int | None,
        key_name: str,
        request_id: str,
    ) -> GenRequest:
        first = pick_seed(seed)
        extra = {
            "images": n,
            "size": f"{params.width}x{params.height}",
            "steps": params.steps,
            "scheduler": params.scheduler.label,
            "seed": first,
            "key": key_name,
        }
        if self.settings.log_prompts:  # off by default: prompts can be personal data
            extra.update(prompt=prompt, negative_prompt=negative)
        log.info("generation requested", extra=extra)
        # Shares of the queue matter only between keys: with one key (or none) it may use it all.
        key_limit = self.settings.per_key_limits()[0] if len(self.keys) > 1 else None
        try:
            return self.engine.submit(
                params,
                prompt,
                negative,
                [first + i for i in range(n)],
                key_name=key_name,
                request_id=request_id,
                key_queue_limit=key_limit,
            )
        except EngineError as e:
            raise self.engine_problem(e) from e

    async def wait(self, request: Request, req: GenRequest) -> list:
        """Wait for the images; a client that goes away or a timeout cancels the request."""
        result = asyncio.wrap_future(req.future)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {result, watcher},
                timeout=self.settings.request_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            watcher.cancel()
        if result in done:
            try:
                return result.result()
            except EngineError as e:
                raise self.engine_problem(e) from e
        self.engine.cancel(req)
        result.cancel()
        if watcher in done:
            log.info("client disconnected; request cancelled")
            raise Problem("client disconnected", status=499, code="cancelled")
        raise Problem(
            f"the request did not finish within {self.settings.request_timeout_s:g}s (SDSERVE_REQUEST_TIMEOUT_S); use POST /v1/jobs for long work",
            status=504,
            code="timeout",
        )

    async def run_png(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.png_pool, fn, *args)

    def drain(self) -> asyncio.Future:
        """Stop serving (SIGTERM): refuse new work at once, let queued and running work finish for
        up to DRAIN_TIMEOUT_S, then answer what is left 503 and stop the worker at its next step.
        Idempotent: the server starts it as soon as the signal comes, the lifespan awaits it."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_once())
        return asyncio.shield(self._drain)

    async def _drain_once(self) -> bool:
        log.info("draining: finishing queued and running work (up to %gs)", self.settings.drain_timeout_s)
        self.engine.refuse_new()
        clean = await asyncio.to_thread(self.engine.drain, self.settings.drain_timeout_s)
        if self.jobs is not None:
            await self.jobs.drain(5)  # their requests are finished or failed: only rendering is left
        return clean

    def public_base(self, request: Request) -> str:
        """Base of url results: PUBLIC_URL; else a trusted proxy's X-Forwarded-Proto/-Host; else the
        address the client connected to. Never the client's own Host header, which it can forge."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        scheme = request.url.scheme
        host, port = request.scope.get("server") or (self.settings.host, self.settings.port)
        netloc = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        if self._from_trusted_proxy(request):
            proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
            fwd_host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
            if proto in ("http", "https"):
                scheme = proto
            if _HOST.fullmatch(fwd_host):
                netloc = fwd_host
        return f"{scheme}://{netloc}"

    def _from_trusted_proxy(self, request: Request) -> bool:
        networks = self.settings.trusted_proxy_networks()
        peer = request.client.host if request.client else None
        if not networks or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in networks)


# A host name or address with an optional port: what a forwarded host may be.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(:[0-9]{1,5})?")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class AuthError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def credentials(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return value.strip()
    if scheme == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


class _KeyScheme(SecurityBase):
    """Documents a way to send the key in the OpenAPI document; `authenticate` does the checking."""

    def __init__(self, model, name: str) -> None:
        self.model = model
        self.scheme_name = name

    async def __call__(self) -> None:
        return None


_BEARER = _KeyScheme(HTTPBearer(description="Authorization: Bearer KEY"), "bearer")
_BASIC = _KeyScheme(
    HTTPBase(scheme="basic", description="HTTP Basic, any user name, the key as password (A1111 clients)"),
    "basic",
)


def authenticate(request: Request, _bearer: None = Security(_BEARER), _basic: None = Security(_BASIC)) -> str:
    """FastAPI dependency: the key's name, or 401. Without keys (loopback only) everyone is "open"."""
    service: Service = request.app.state.service
    if not service.keys.enabled:
        name = "open"
    else:
        key = credentials(request)
        if key is None:
            raise AuthError(
                "an API key is required: send `Authorization: Bearer KEY` (or HTTP Basic with the key as password)"
            )
        name = service.keys.lookup(key)
        if name is None:
            raise AuthError("the API key is not valid")
    request.scope.setdefault("state", {})["key_name"] = name
    return name


def new_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time())}-{secrets.token_hex(8)}"
