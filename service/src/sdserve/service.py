"""What the routes share: settings, engine, keys, jobs, and the wait for a generation."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import Request

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

    @property
    def model_id(self) -> str:
        if self.engine.model is not None:
            return self.engine.model.model_id
        return self.settings.model_id or (self.settings.model.resolve().name if self.settings.model else "")

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
        try:
            return self.engine.submit(
                params,
                prompt,
                negative,
                [first + i for i in range(n)],
                key_name=key_name,
                request_id=request_id,
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


def authenticate(request: Request) -> str:
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
