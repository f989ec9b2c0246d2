"""OpenAI Images API: POST /v1/images/generations, GET /v1/models."""

from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import MAX_SEED, GenParams
from .errors import BODY, responses
from .images import Infotext, encode_b64_png, encode_png, expired
from .service import Service, authenticate, new_id
from .settings import parse_size
from .validation import Problem, RequestModel, build_params, check_prompt

router = APIRouter()


class ImageGenerationRequest(RequestModel):
    """OpenAI's fields, plus negative_prompt, seed, steps, guidance_scale, scheduler."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw.")
    model: str | None = Field(
        None, description="The loaded model's id (see GET /v1/models); omitted: the loaded model."
    )
    n: int = Field(1, ge=1, le=256, description="Images to generate (at most SDSERVE_MAX_IMAGES).")
    size: str | None = Field(
        None,
        pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
        description='"WxH", multiples of 8; omitted: the model\'s native size.',
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(
        None,
        max_length=256,
        description="Accepted and ignored, as a hint for abuse tracking in OpenAI's API.",
    )
    quality: Literal["auto", "standard"] | None = Field(
        None, description='Only "auto"/"standard": steps set quality here.'
    )
    output_format: Literal["png"] | None = None
    negative_prompt: str | None = None
    seed: int | None = Field(
        None,
        ge=-1,
        le=MAX_SEED,
        description="Seed of the first image; image i uses seed+i. -1 or omitted: random.",
    )
    steps: int | None = Field(None, ge=1, description="Denoising steps (default SDSERVE_DEFAULT_STEPS).")
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: str | None = Field(
        None, description='A1111 sampler and schedule type, e.g. "DPM++ 2M Karras", "Euler a", "PNDM".'
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


def params_for(service: Service, body: ImageGenerationRequest) -> tuple[GenParams, int, int]:
    s = service.settings
    if body.model is not None and body.model != service.model_id:
        raise Problem(
            f"model: {body.model!r} is not served here; the loaded model is {service.model_id!r}",
            "model",
            status=404,
            code="model_not_found",
        )
    if body.response_format == "url" and s.output_dir is None:
        raise Problem(
            "response_format: url needs SDSERVE_OUTPUT_DIR on the server; use b64_json", "response_format"
        )
    check_prompt(s, body.prompt, "prompt")
    check_prompt(s, body.negative_prompt or "", "negative_prompt")
    if body.size:
        width, height = parse_size(body.size)
    else:
        width, height = service.native_size
    params = build_params(
        s,
        width=width,
        height=height,
        n=body.n,
        steps=body.steps,
        guidance=body.guidance_scale,
        sampler=body.scheduler,
        schedule=None,
        has_negative=bool(body.negative_prompt),
        names={"width": "size", "height": "size", "pixels": "n"},
    )
    return params, width, height


async def render(
    service: Service,
    base_url: str,  # of url results: Service.public_base
    body: ImageGenerationRequest,
    params: GenParams,
    seeds: list[int],
    images: list,
) -> dict:
    """The response body for finished images (shared by the synchronous route and jobs)."""
    data = []
    for seed, image in zip(seeds, images, strict=True):
        text = str(Infotext(body.prompt, body.negative_prompt or "", params, seed, service.model_id))
        if body.response_format == "url":
            name = f"{new_id('img')}.png"
            png = await service.run_png(encode_png, image, text)
            await service.run_png(_write, service.settings.output_dir / name, png)
            data.append(
                {"url": f"{base_url}/v1/images/files/{name}", "revised_prompt": body.prompt, "seed": seed}
            )
        else:
            data.append(
                {
                    "b64_json": await service.run_png(encode_b64_png, image, text),
                    "revised_prompt": body.prompt,
                    "seed": seed,
                }
            )
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": "png",
        "size": f"{params.width}x{params.height}",
    }


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=responses(*BODY, 401, 404, 429, 500, 503, 504),
)
async def generations(body: ImageGenerationRequest, request: Request, key_name: str = Depends(authenticate)):
    service: Service = request.app.state.service
    params, _, _ = params_for(service, body)
    req = service.submit(
        params, body.prompt, body.negative_prompt or "", body.n, body.seed, key_name, request.state.request_id
    )
    images = await service.wait(request, req)
    return await render(service, service.public_base(request), body, params, req.seeds, images)


# The names new_id() gives written images; nothing else is ever looked up on disk.
IMAGE_NAME = re.compile(r"[a-z0-9]{1,16}-[0-9]{1,12}-[0-9a-f]{16}\.png")


@router.get(
    "/v1/images/files/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG."}, **responses(404)},
)
async def image_file(name: str, request: Request):
    """Images written for response_format=url. The random name is the capability (as OpenAI's signed URLs)."""
    service: Service = request.app.state.service
    if service.settings.output_dir is None or not IMAGE_NAME.fullmatch(name):
        raise Problem("no such image", "name", status=404, code="not_found")
    path = service.settings.output_dir / name
    # Past the retention it is gone, even before the next sweep removes the file.
    if not path.is_file() or expired(path, service.settings.output_retention_s):
        raise Problem("no such image", "name", status=404, code="not_found")
    return FileResponse(path, media_type="image/png")


@router.get("/v1/models", responses=responses(401))
async def models(request: Request, key_name: str = Depends(authenticate)):
    service: Service = request.app.state.service
    return {
        "object": "list",
        "data": [{"id": service.model_id, "object": "model", "created": 0, "owned_by": "sdserve"}],
    }


@router.get("/v1/models/{model_id:path}", responses=responses(401, 404))
async def model(model_id: str, request: Request, key_name: str = Depends(authenticate)):
    service: Service = request.app.state.service
    if model_id != service.model_id:
        raise Problem(f"model {model_id!r} is not served here", "model", status=404, code="model_not_found")
    return {"id": service.model_id, "object": "model", "created": 0, "owned_by": "sdserve"}
