"""Async jobs: a generation that outlives its HTTP request. The store holds each job until it has
been finished for JOB_TTL_S; its result is whatever body the front door renders from the images
(the routes are in api/jobs.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .engine import GenRequest
from .errors import EngineError, Problem
from .generation import Generations, GenerationSpec, Image, Partial, new_id
from .settings import Settings

log = logging.getLogger("sdserve.jobs")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
Render = Callable[[list[Image]], Awaitable[dict]]


class Job:
    def __init__(self, owner: str) -> None:
        self.id = new_id("job")
        self.owner = owner
        self.req: GenRequest  # set when submitted, right after
        self.latest: Partial | None = None  # the newest preview, while it runs (partial_images > 0)
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

    def keep_partial(self, image: int, index: int, picture) -> None:
        """The engine's preview callback (on its worker thread): swapping one reference is atomic."""
        self.latest = Partial(image, index, picture)

    def view(self, preview: tuple[Partial, str] | None = None) -> dict:
        """The job as GET shows it; `preview`, a preview and its PNG in base64, goes in its progress."""
        r = self.req
        out = {
            "id": self.id,
            "object": "image.generation.job",
            "status": self.status,
            "created": self.created,
            "progress": {
                "step": r.params.steps if r.succeeded else r.step,
                "steps": r.params.steps,
                "images_done": r.done,
                "images": r.n,
                "fraction": round(r.progress, 4),
            },
        }
        if preview is not None:
            shown, b64 = preview
            out["progress"]["partial_image"] = {
                "b64_json": b64,
                "image_index": shown.image,
                "partial_image_index": shown.index,
            }
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class JobStore:
    def __init__(self, settings: Settings, generations: Generations, key_count: Callable[[], int]) -> None:
        self.settings = settings
        self.generations = generations
        self._key_count = key_count
        self.jobs: dict[str, Job] = {}

    def create(
        self, spec: GenerationSpec, key_name: str, request_id: str, render: Render, partials: int = 0
    ) -> Job:
        """Submit a job; with `partials`, the engine hands it that many previews an image as it runs."""
        self.expire()
        if len(self.jobs) >= self.settings.max_jobs:
            raise Problem(
                f"{len(self.jobs)} jobs are held ({self.settings.name('max_jobs')}); "
                "fetch or delete finished ones, or retry later",
                status=429,
                code="too_many_jobs",
                headers={"Retry-After": "5"},
            )
        if self._key_count() > 1:  # shares matter only between keys
            held = sum(1 for j in self.jobs.values() if j.owner == key_name)
            limit = self.settings.per_key_limits()[1]
            if held >= limit:
                raise Problem(
                    f"this key holds {held} jobs, its limit ({self.settings.name('max_jobs_per_key')}); "
                    "delete finished ones, or retry later",
                    status=429,
                    code="too_many_jobs_for_key",
                    headers={"Retry-After": "5"},
                )
        job = Job(key_name)
        job.req = self.generations.submit(
            spec, key_name, request_id, partials, job.keep_partial if partials else None
        )
        self.jobs[job.id] = job
        job.task = asyncio.ensure_future(self._finish(job, spec, render))
        return job

    async def _finish(self, job: Job, spec: GenerationSpec, render: Render) -> None:
        try:
            generated = await asyncio.wrap_future(job.req.future)
            job.result = await render(await self.generations.images(spec, job.req, generated))
        except EngineError as e:
            job.error = {
                "message": e.message,
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
            job.latest = None  # the result holds the images now

    def get(self, job_id: str, key_name: str) -> Job:
        self.expire()
        job = self.jobs.get(job_id)
        # Another key's job reads as missing: ids must not leak whose work exists.
        if job is None or (job.owner != key_name and self._key_count() > 0):
            raise Problem(
                f"no job {job_id!r} (finished jobs are kept {self.settings.job_ttl_s:g}s)",
                "id",
                status=404,
                code="not_found",
            )
        return job

    async def remove(self, job: Job) -> None:
        """Cancel a queued or running job and forget it."""
        if job.status in ("queued", "running"):
            self.generations.engine.cancel(job.req)
            if job.task:
                await asyncio.wait({job.task}, timeout=5)
        self.jobs.pop(job.id, None)

    def expire(self) -> None:
        ttl = self.settings.job_ttl_s
        now = time.monotonic()
        for job_id in [
            j.id for j in self.jobs.values() if j.finished_at is not None and now - j.finished_at > ttl
        ]:
            del self.jobs[job_id]

    async def janitor(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.settings.job_ttl_s / 2))
            self.expire()

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for job in list(self.jobs.values()):
            counts[job.status] += 1
        return counts

    async def drain(self, timeout: float) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task and not j.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
