"""Async jobs over HTTP: POST /v1/jobs takes the body of /v1/images/generations, POST
/v1/images/edits/jobs the form of /v1/images/edits (not under /v1/jobs/, where it would read as a
job id); both answer 202. GET /v1/jobs/{id} gives status, progress (with `?partial_image=true`, the newest preview of a
job created with `partial_images`) and, when done, the body the synchronous route gives."""

from __future__ import annotations

import base64
from functools import partial

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..errors import BODY, Problem, responses
from ..images import encode
from .deps import KeyName, PublicBase, RequestId, ServiceDep
from .forms import Form
from .openai import EDIT_FORM, ImageGenerationRequest, edit_spec, render, spec_of

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, responses=responses(*BODY, 401, 404, 429, 503))
async def create_job(
    body: ImageGenerationRequest,
    service: ServiceDep,
    key_name: KeyName,
    request_id: RequestId,
    base_url: PublicBase,
):
    return _create(service, body, spec_of(service, body), key_name, request_id, base_url)


@router.post(
    "/v1/images/edits/jobs",
    status_code=202,
    responses=responses(*BODY, 401, 404, 429, 503),
    openapi_extra=EDIT_FORM,
)
async def create_edit_job(
    key_name: KeyName, form: Form, service: ServiceDep, request_id: RequestId, base_url: PublicBase
):
    """An image edit as a job: the form of POST /v1/images/edits."""
    body, spec = await edit_spec(service, form)
    return _create(service, body, spec, key_name, request_id, base_url)


def _create(service, body: ImageGenerationRequest, spec, key_name: str, request_id: str, base_url: str):
    if body.stream:
        raise Problem("stream: a job is not streamed; poll GET /v1/jobs/{id} for its progress", "stream")
    job = service.jobs.create(
        spec,
        key_name,
        request_id,
        partial(render, service.generations, base_url, body),
        partials=body.partial_images or 0,
    )
    return JSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs/{job_id}", responses=responses(401, 404, 422))
async def get_job(job_id: str, service: ServiceDep, key_name: KeyName, partial_image: bool = False):
    """With `partial_image=true`, a running job created with `partial_images` shows its newest
    preview in `progress.partial_image` (PNG, base64), as a stream's partial_image events carry it."""
    job = service.jobs.get(job_id, key_name)
    latest = job.latest if partial_image else None
    if latest is None:
        return job.view()
    png = await service.generations.off_loop(encode, latest.picture, "", "png", None)
    return job.view((latest, base64.b64encode(png).decode("ascii")))


@router.delete("/v1/jobs/{job_id}", responses=responses(401, 404))
async def delete_job(job_id: str, service: ServiceDep, key_name: KeyName):
    """Cancel a queued or running job and remove it (a running batch stops at its next step when all
    its requests are cancelled); answers the job as it ended. Afterwards the id answers 404."""
    job = service.jobs.get(job_id, key_name)
    await service.jobs.remove(job)
    return job.view()
