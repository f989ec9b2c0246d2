"""Async jobs: POST /v1/jobs answers 202 with an id; GET /v1/jobs/{id} gives status,
progress and, when done, the body POST /v1/images/generations would have given."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from .api_openai import ImageGenerationRequest, params_for, render
from .engine import EngineError, GenRequest
from .errors import BODY, responses
from .service import Service, authenticate, new_id
from .validation import Problem

log = logging.getLogger("sdserve.jobs")
router = APIRouter()


class Job:
    def __init__(self, owner: str, req: GenRequest) -> None:
        self.id = new_id("job")
        self.owner = owner
        self.req = req
        self.created = int(time.time())
        self.result: dict | None = None
        self.error: dict | None = None
        self.finished_at: float | None = None
        self.task: asyncio.Task | None = None

    @property
    def status(self) -> str:
        if self.result is not None:
            return "succeeded"
        if self.error is not None:
            return "cancelled" if self.error["code"] == "cancelled" else "failed"
        return "queued" if self.req.started_at is None else "running"

    def view(self) -> dict:
        r = self.req
        out = {
            "id": self.id,
            "object": "image.generation.job",
            "status": self.status,
            "created": self.created,
            "progress": {
                "step": r.step if r.taken > r.done else (r.params.steps if r.done == r.n else 0),
                "steps": r.params.steps,
                "images_done": r.done,
                "images": r.n,
                "fraction": round(r.progress, 4),
            },
        }
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class JobStore:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.jobs: dict[str, Job] = {}

    def create(self, body: ImageGenerationRequest, base_url: str, key_name: str, request_id: str) -> Job:
        self.expire()
        if len(self.jobs) >= self.service.settings.max_jobs:
            raise Problem(
                f"{len(self.jobs)} jobs are held (SDSERVE_MAX_JOBS); fetch or delete finished ones, or retry later",
                status=429,
                code="too_many_jobs",
                headers={"Retry-After": "5"},
            )
        if len(self.service.keys) > 1:  # shares matter only between keys
            held = sum(1 for j in self.jobs.values() if j.owner == key_name)
            limit = self.service.settings.per_key_limits()[1]
            if held >= limit:
                raise Problem(
                    f"this key holds {held} jobs, its limit (SDSERVE_MAX_JOBS_PER_KEY); delete finished ones, or retry later",
                    status=429,
                    code="too_many_jobs_for_key",
                    headers={"Retry-After": "5"},
                )
        params, _, _ = params_for(self.service, body)
        req = self.service.submit(
            params, body.prompt, body.negative_prompt or "", body.n, body.seed, key_name, request_id
        )
        job = Job(key_name, req)
        self.jobs[job.id] = job
        job.task = asyncio.ensure_future(self._finish(job, body, params, base_url))
        return job

    async def _finish(self, job: Job, body, params, base_url: str) -> None:
        try:
            images = await asyncio.wrap_future(job.req.future)
            job.result = await render(self.service, base_url, body, params, job.req.seeds, images)
        except EngineError as e:
            job.error = {
                "message": str(e),
                "type": "server_error" if e.status >= 500 else "invalid_request_error",
                "code": e.code,
            }
        except Exception as e:  # a bug; the job reports it instead of vanishing
            log.exception("job %s failed", job.id)
            job.error = {
                "message": f"internal error ({type(e).__name__})",
                "type": "server_error",
                "code": "internal_error",
            }
        finally:
            job.finished_at = time.monotonic()

    def get(self, job_id: str, key_name: str) -> Job:
        self.expire()
        job = self.jobs.get(job_id)
        # Another key's job reads as missing: ids must not leak whose work exists.
        if job is None or (job.owner != key_name and self.service.keys.enabled):
            raise Problem(
                f"no job {job_id!r} (finished jobs are kept {self.service.settings.job_ttl_s:g}s)",
                "id",
                status=404,
                code="not_found",
            )
        return job

    def expire(self) -> None:
        ttl = self.service.settings.job_ttl_s
        now = time.monotonic()
        for job_id in [
            j.id for j in self.jobs.values() if j.finished_at is not None and now - j.finished_at > ttl
        ]:
            del self.jobs[job_id]

    async def janitor(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.service.settings.job_ttl_s / 2))
            self.expire()

    def update_metrics(self) -> None:
        counts = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
        for job in self.jobs.values():
            counts[job.status] += 1
        for status, count in counts.items():
            self.service.metrics.jobs.labels(status).set(count)

    async def remove(self, job: Job) -> None:
        """Cancel a queued or running job and forget it."""
        if job.status in ("queued", "running"):
            self.service.engine.cancel(job.req)
            if job.task:
                await asyncio.wait({job.task}, timeout=5)
        self.jobs.pop(job.id, None)

    async def drain(self, timeout: float) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task and not j.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


@router.post("/v1/jobs", status_code=202, responses=responses(*BODY, 401, 404, 429, 503))
async def create_job(body: ImageGenerationRequest, request: Request, key_name: str = Depends(authenticate)):
    service: Service = request.app.state.service
    job = service.jobs.create(body, service.public_base(request), key_name, request.state.request_id)
    return JSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs/{job_id}", responses=responses(401, 404))
async def get_job(job_id: str, request: Request, key_name: str = Depends(authenticate)):
    service: Service = request.app.state.service
    return service.jobs.get(job_id, key_name).view()


@router.delete("/v1/jobs/{job_id}", responses=responses(401, 404))
async def delete_job(job_id: str, request: Request, key_name: str = Depends(authenticate)):
    """Cancel a queued or running job and remove it (a running batch stops at its next step when all
    its requests are cancelled); answers the job as it ended. Afterwards the id answers 404."""
    service: Service = request.app.state.service
    job = service.jobs.get(job_id, key_name)
    await service.jobs.remove(job)
    return job.view()
