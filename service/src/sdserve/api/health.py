"""The service's own routes: liveness, readiness (which the deploy and a gateway check) and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from ..errors import responses
from ..settings import Settings
from .deps import ServiceDep, authenticate


class Health(BaseModel):
    status: str
    model: str | None = None
    queue: int | None = None
    error: str | None = None


_NOT_OK = {503: {"model": Health, "description": "Not live (failed start-up), or not ready."}}


def router_for(settings: Settings) -> APIRouter:
    """The routes; /metrics needs a key unless METRICS_PUBLIC."""
    router = APIRouter(tags=["health"])

    @router.get("/livez", response_model=Health, response_model_exclude_none=True, responses=_NOT_OK)
    async def livez(service: ServiceDep):
        engine = service.engine
        if engine.state == "failed":
            return JSONResponse({"status": "failed", "error": engine.error}, status_code=503)
        return {"status": "ok"}

    @router.get("/readyz", response_model=Health, response_model_exclude_none=True, responses=_NOT_OK)
    async def readyz(service: ServiceDep):
        engine = service.engine
        if engine.ready:
            return {"status": "ready", "model": service.model_id, "queue": engine.queue_depth}
        return JSONResponse(
            {"status": str(engine.state), "error": engine.error},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @router.get(
        "/metrics",
        dependencies=[] if settings.metrics_public else [Depends(authenticate)],
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                  "description": "Prometheus text exposition format."},
            **({} if settings.metrics_public else responses(401)),
        },
    )  # fmt: skip
    async def metrics(service: ServiceDep):
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
