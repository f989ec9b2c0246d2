"""The FastAPI app: `create_app(settings)`: the service, the middleware every request passes
(request id, body limits, metrics, the access log), one error handler per kind, the front doors
from api/, and start-up and shutdown in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, openapi
from .api import a1111, health, jobs
from .api import openai as openai_api
from .api.deps import key_in
from .errors import Problem, error_body
from .images import sweep_outputs
from .logs import request_id as request_id_var
from .service import Service
from .settings import Settings, point_caches_at

log = logging.getLogger("sdserve.app")
access = logging.getLogger("sdserve.access")

NO_KEYS_MESSAGE = (
    "refusing to listen on {host} without API keys. Create a key and its hash line, e.g.\n"
    "  openssl rand -hex 32 > key.txt\n"
    "  sdserve hash-key --name alice < key.txt >> /etc/sdserve/api-keys\n"
    "then set SDSERVE_API_KEYS_FILE=/etc/sdserve/api-keys (or --api-keys-file), or listen on 127.0.0.1."
)


class StartupRefused(RuntimeError):
    pass


class BodyTooLarge(StarletteHTTPException):
    """An HTTPException so FastAPI's body reader passes it through unchanged."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes ({setting})")


class BodyTimeout(StarletteHTTPException):
    def __init__(self, seconds: float, setting: str) -> None:
        super().__init__(
            408,
            f"the request body did not arrive within {seconds:g}s ({setting})",
            headers={"Connection": "close"},
        )


IMAGE_ROUTES = frozenset(
    {"/sdapi/v1/img2img", "/sdapi/v1/png-info", "/v1/images/edits", "/v1/images/edits/jobs"}
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContext:
    """Pure ASGI middleware: request id, body size and read-time limits, per-route metrics, one
    access log line."""

    def __init__(self, app, service_ref) -> None:
        self.app = app
        self.service_ref = service_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service: Service = self.service_ref()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        # Routes that carry images (base64 or multipart) have their own, larger limit, for a caller
        # with a key: one without gets the small one, so it cannot make us hold images it may not send.
        image_route = scope["path"] in IMAGE_ROUTES
        if image_route and service.keys.enabled:
            key = key_in(headers.get(b"authorization", b"").decode("latin-1"))
            image_route = key is not None and service.keys.lookup(key) is not None
        setting = "max_image_body_bytes" if image_route else "max_body_bytes"
        limit = getattr(service.settings, setting)
        read_timeout = service.settings.read_timeout_s
        status = {"code": 500}
        start = time.perf_counter()

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_json(
                send,
                413,
                error_body(
                    scope["path"],
                    BodyTooLarge(limit, service.settings.name(setting)).detail,
                    None,
                    "request_too_large",
                    413,
                ),
                rid,
            )
            status["code"] = 413
            self._record(service, scope, status["code"], start)
            request_id_var.reset(token)
            return

        seen = 0
        body_done = False

        async def limited_receive():
            """The body: counted against the limit, and each part due within the read timeout (a
            slow client must not hold a connection). After it, only a disconnect is awaited."""
            nonlocal seen, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), read_timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(read_timeout, service.settings.name("read_timeout_s")) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, service.settings.name(setting))
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        finally:
            self._record(service, scope, status["code"], start)
            request_id_var.reset(token)

    @staticmethod
    def _record(service: Service, scope, code: int, start: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        key = scope.get("state", {}).get("key_name", "-")
        seconds = time.perf_counter() - start
        service.metrics.requests.labels(template, scope["method"], str(code), key).inc()
        service.metrics.request_seconds.labels(template).observe(seconds)
        if template not in ("/livez", "/readyz", "/metrics"):
            access.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                code,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": code,
                    "seconds": round(seconds, 4),
                    "key": key,
                },
            )


async def _send_json(send, status: int, body: dict, rid: str) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"x-request-id", rid.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem):
        body = error_body(request.url.path, exc.message, exc.param, exc.code, exc.status)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        path = request.url.path
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            message = f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            return JSONResponse(error_body(path, message, None, "invalid_json", 400), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not loc and first.get("loc", ())[:1] == ("body",):
            # No body, or a body that is not a JSON object (e.g. a missing Content-Type).
            message = "the request body must be a JSON object (Content-Type: application/json)"
            return JSONResponse(error_body(path, message, None, "invalid_json", 400), status_code=400)
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        field_errors = [
            {
                "loc": [p for p in e.get("loc", ()) if p != "body"],
                "msg": e.get("msg", ""),
                "type": e.get("type", ""),
            }
            for e in errors
        ]
        body = error_body(path, message, param, first.get("type") or "invalid_value", 422, field_errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {
            404: "not_found",
            405: "method_not_allowed",
            408: "request_timeout",
            413: "request_too_large",
        }
        body = error_body(
            request.url.path, str(exc.detail), None, codes.get(exc.status_code), exc.status_code
        )
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first route's methods; a path may have several routes.
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        message = f"internal error ({type(exc).__name__}); see the server log"
        return JSONResponse(
            error_body(request.url.path, message, None, "internal_error", 500), status_code=500
        )


def allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI document gives for this request's path (Starlette's 405 names only
    the first matching route's methods, and a path may have several routes)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        pattern = re.sub(r"\{[^}:]+(:path)?\}", lambda m: ".+" if m[1] else "[^/]+", template)
        if re.fullmatch(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def sweep_outputs_every(settings: Settings) -> None:
    """Keep OUTPUT_DIR within its retention, so that url images and saved images cannot fill the disk."""
    if settings.output_dir is None or settings.output_retention_s <= 0:
        return
    while True:
        with contextlib.suppress(OSError):  # a full or read-only disk must not end the sweeps
            removed = await asyncio.to_thread(sweep_outputs, settings.output_dir, settings.output_retention_s)
            if removed:
                log.info("removed %d images past the output retention", removed)
        await asyncio.sleep(min(60.0, settings.output_retention_s / 4))


def create_app(settings: Settings, *, start_engine: bool = True) -> FastAPI:
    """Build the app. Refuses (StartupRefused) to serve a non-loopback address without keys."""
    point_caches_at(settings.cache_dir)
    service = Service.build(settings)
    if not service.keys.enabled and not settings.host_is_loopback():
        raise StartupRefused(NO_KEYS_MESSAGE.format(host=settings.host))
    if settings.output_dir is not None:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
    engine, keys = service.engine, service.keys

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        hup = False
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, keys.reload)
                hup = True
        if start_engine and engine.state == "created":
            engine.start()
        janitor = asyncio.ensure_future(service.jobs.janitor())
        sweeper = asyncio.ensure_future(sweep_outputs_every(settings))
        log.info(
            "sdserve %s starting on %s:%d (keys: %d)", __version__, settings.host, settings.port, len(keys)
        )
        try:
            yield
        finally:
            finished = await service.drain()  # begun at SIGTERM already when run by `sdserve serve`
            service.close()
            janitor.cancel()
            sweeper.cancel()
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            log.info("stopped (drained cleanly: %s)", finished)

    app = FastAPI(
        title="sdserve",
        version=__version__,
        summary="Stable Diffusion text-to-image service: OpenAI Images and AUTOMATIC1111 compatible APIs",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(RequestContext, service_ref=lambda: service)
    _install_error_handlers(app)
    app.include_router(health.router_for(settings))
    app.include_router(openai_api.router)
    app.include_router(a1111.router)
    app.include_router(jobs.router)

    def document() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.describe(
                get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes),
                settings,
                service.model_id,
                {
                    "Txt2ImgRequest": a1111.AT_DEFAULT,
                    "Img2ImgRequest": {**a1111.AT_DEFAULT, **a1111.IMG2IMG_AT_DEFAULT},
                },
                a1111.current_options(service),
            )
        return app.openapi_schema

    app.openapi = document
    return app
