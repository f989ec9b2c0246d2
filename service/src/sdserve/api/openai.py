"""OpenAI Images API: POST /v1/images/generations, POST /v1/images/edits (multipart: an image and
an optional mask), GET /v1/models, and the files url results name."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine import MAX_SEED
from ..errors import BODY, Problem, error_type, responses
from ..generation import Generations, GenerationSpec, Image, Partial, make_spec
from ..images import MEDIA_TYPES, encode, expired
from ..inputs import Source, has_alpha, img2img_source, inpaint_source, open_image, transparent_mask
from ..service import Service
from ..settings import parse_size
from ..validation import RequestModel
from .deps import KeyName, PublicBase, RequestId, ServiceDep, client_gone
from .forms import Form, Part

router = APIRouter(tags=["openai"])


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
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description='Omitted: "png".')
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality, 0-100 (default 100); not with png."
    )
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
    stream: bool = Field(False, description="Answer with server-sent events: previews, then each image.")
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="Previews per image when streaming, or for a job's progress (fewer when the steps are few).",
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int
    nsfw: bool | None = Field(
        None,
        description="Only with SDSERVE_SAFETY_CHECKER: the model's checker flagged (and blacked out) it.",
    )


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of an edit (multipart, so numbers arrive as text); `image` and `mask` are files."""

    model_config = ConfigDict(extra="forbid", strict=False)

    strength: float | None = Field(
        None, gt=0, le=1, description="How far from the image to go; default 1 with a mask, else 0.75."
    )


def spec_of(
    service: Service,
    body: ImageGenerationRequest,
    *,
    size: tuple[int, int] | None = None,
    source: Source | None = None,
    strength: float | None = None,
) -> GenerationSpec:
    """The request as a generation spec; a Problem names the field at fault. `size`: the default
    when the body gives none (else the model's native size); `source`: an edit's input."""
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
            f"response_format: url is off on this server (it needs {s.name('output_dir')}); use b64_json",
            "response_format",
        )
    if body.stream and body.response_format == "url":
        raise Problem("response_format: streamed images come as b64_json, never url", "response_format")
    if body.output_compression is not None and body.output_format in (None, "png"):
        raise Problem("output_compression: only for output_format jpeg or webp", "output_compression")
    width, height = parse_size(body.size) if body.size else size or service.native_size
    return make_spec(
        s,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or "",
        width=width,
        height=height,
        n=body.n,
        steps=body.steps,
        guidance=body.guidance_scale,
        sampler=body.scheduler,
        seed=body.seed,
        source=source,
        strength=strength,
        names={"width": "size", "height": "size", "pixels": "n"},
    )


async def render(
    generations: Generations, base_url: str, body: ImageGenerationRequest, images: list[Image]
) -> dict:
    """The response body for finished images (the synchronous route's and a job's result)."""
    data = []
    checked = generations.settings.safety_checker
    fmt, quality = body.output_format or "png", body.output_compression
    for image in images:
        item: dict = {"revised_prompt": body.prompt, "seed": image.seed}
        if body.response_format == "url":
            name = await generations.save(image, fmt=fmt, quality=quality)
            item["url"] = f"{base_url}/v1/images/files/{name}"
        else:
            item["b64_json"] = await generations.b64(image, fmt, quality)
        if checked:
            item["nsfw"] = image.nsfw
        data.append(item)
    p = images[0] if images else None
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": fmt,
        "size": f"{p.picture.width}x{p.picture.height}" if p else "",
    }


# Token usage, which OpenAI's completed events carry (for its GPT image models): none here.
_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
          "total_tokens": 0}  # fmt: skip
STREAMED = {
    200: {"content": {"text/event-stream": {}}, "description": "The images, or with `stream` events."}
}


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def events(
    generations: Generations, body: ImageGenerationRequest, spec: GenerationSpec,
    items: AsyncIterator[Partial | list[Image]], kind: str,
) -> AsyncIterator[bytes]:  # fmt: skip
    """OpenAI's streamed answer: `{kind}.partial_image` events (previews from the latents mid-run),
    then a `{kind}.completed` event an image; a failure after the start is an `error` event."""
    fmt, quality = body.output_format or "png", body.output_compression
    p = spec.params

    def common() -> dict:
        return {"created_at": int(time.time()), "size": f"{p.width}x{p.height}", "quality": "auto",
                "background": "opaque", "output_format": fmt}  # fmt: skip

    try:
        async for item in items:
            if isinstance(item, Partial):
                data = await generations.off_loop(encode, item.picture, "", fmt, quality)
                yield _event(f"{kind}.partial_image", {"type": f"{kind}.partial_image",
                             "b64_json": base64.b64encode(data).decode("ascii"), **common(),
                             "partial_image_index": item.index, "image_index": item.image})  # fmt: skip
                continue
            for i, image in enumerate(item):
                b64 = await generations.b64(image, fmt, quality)
                yield _event(f"{kind}.completed", {"type": f"{kind}.completed", "b64_json": b64, **common(),
                             "usage": _USAGE, "image_index": i, "seed": image.seed})  # fmt: skip
    except Problem as e:
        error = {"message": e.message, "type": error_type(e.status), "param": e.param, "code": e.code}
        yield _event("error", {"type": "error", "error": error})


def stream_of(
    generations: Generations, body: ImageGenerationRequest, spec: GenerationSpec, key_name: str,
    request_id: str, kind: str,
) -> StreamingResponse:  # fmt: skip
    """Submitted before the answer starts: a full queue is still a 429, not an event."""
    items = generations.stream(spec, key_name, request_id, body.partial_images or 0)
    return StreamingResponse(
        events(generations, body, spec, items, kind),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={**STREAMED, **responses(*BODY, 401, 404, 429, 500, 503, 504)},
)
async def generations(
    body: ImageGenerationRequest, service: ServiceDep, key_name: KeyName, request_id: RequestId,
    base_url: PublicBase, request: Request,
):  # fmt: skip
    spec = spec_of(service, body)
    if body.stream:
        return stream_of(service.generations, body, spec, key_name, request_id, "image_generation")
    images = await service.generations.run(spec, key_name, request_id, partial(client_gone, request))
    return await render(service.generations, base_url, body, images)


EDIT_SCHEMA = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "A PNG, JPEG or WebP image."},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "A PNG the image's size: fully transparent pixels are edited. Omitted: the "
            "image's own transparent pixels, or, with none, the whole image (image-to-image).",
        },
        **ImageEditRequest.model_json_schema()["properties"],
    },
}


EDIT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": EDIT_SCHEMA}}}}


def _edit_body(form: list[Part]) -> tuple[ImageEditRequest, bytes, bytes | None]:
    """An edit's fields, image and mask from its form; a Problem names the field at fault."""
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in form:
        name = "image" if part.name == "image[]" else part.name
        if name in fields or name in files:
            raise Problem(f"{name}: given more than once (one image per edit)", name)
        if name in ("image", "mask"):
            files[name] = part.data
            continue
        try:
            fields[name] = part.data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Problem(f"{name}: not UTF-8 text", name) from e
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        raise Problem(f"{param}: {first['msg']}" if param else first["msg"], param) from None
    if "image" not in files:
        raise Problem("image: required", "image")
    return body, files["image"], files.get("mask")


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={**STREAMED, **responses(*BODY, 401, 404, 429, 500, 503, 504)},
    openapi_extra=EDIT_FORM,
)
async def edits(
    key_name: KeyName, form: Form, service: ServiceDep, request_id: RequestId, base_url: PublicBase,
    request: Request,
):  # fmt: skip
    """Edit an image where its mask is transparent (inpainting: every other pixel is the image's),
    or, without a mask or transparency, as a whole (image-to-image)."""
    body, spec = await edit_spec(service, form)
    if body.stream:
        return stream_of(service.generations, body, spec, key_name, request_id, "image_edit")
    images = await service.generations.run(spec, key_name, request_id, partial(client_gone, request))
    return await render(service.generations, base_url, body, images)


async def edit_spec(service: Service, form: list[Part]) -> tuple[ImageEditRequest, GenerationSpec]:
    """An edit's form as its fields and a spec (the synchronous route's and a job's); a Problem names
    the field at fault."""
    body, image_data, mask_data = _edit_body(form)
    limit, generations = service.settings.max_pixels, service.generations

    def decode():
        image = open_image(image_data, "image", limit)
        if mask_data is not None:
            mask = open_image(mask_data, "mask", limit)
            if mask.size != image.size:
                raise Problem(
                    f"mask: {mask.width}x{mask.height}, but the image is {image.width}x{image.height}", "mask"
                )
            return image, transparent_mask(mask)
        return image, transparent_mask(image) if has_alpha(image) else None

    image, mask = await generations.off_loop(decode)
    if mask is not None and mask.getbbox() is None:
        raise Problem(
            "mask: no fully transparent pixel, so nothing to edit", "mask" if mask_data else "image"
        )
    spec = spec_of(service, body, size=(image.width // 8 * 8, image.height // 8 * 8))  # checks all fields
    w, h = spec.params.width, spec.params.height
    if mask is None:
        source = await generations.off_loop(img2img_source, image, w, h)
    else:
        # The blur softens the edge inside the mask only: nothing outside it changes.
        source = await generations.off_loop(
            partial(inpaint_source, image, mask, w, h, fill_masked=True, inside_only=True)
        )
    strength = body.strength if body.strength is not None else 1.0 if mask is not None else 0.75
    return body, spec_of(service, body, size=(w, h), source=source, strength=strength)


# The names Generations.save gives written images; nothing else is ever looked up on disk.
IMAGE_NAME = re.compile(r"[a-z0-9]{1,16}-[0-9]{1,12}-[0-9a-f]{16}\.(png|jpeg|webp)")


@router.get(
    "/v1/images/files/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "The image."},
        **responses(404),
    },
)
async def image_file(name: str, service: ServiceDep):
    """Images written for response_format=url. The random name is the capability (as OpenAI's signed URLs)."""
    out = service.settings.output_dir
    if out is None or not IMAGE_NAME.fullmatch(name):
        raise Problem("no such image", "name", status=404, code="not_found")
    path = out / name
    # Past the retention it is gone, even before the next sweep removes the file.
    if not path.is_file() or expired(path, service.settings.output_retention_s):
        raise Problem("no such image", "name", status=404, code="not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix[1:]])


def _model(service: Service) -> dict:
    return {"id": service.model_id, "object": "model", "created": 0, "owned_by": "sdserve"}


@router.get("/v1/models", responses=responses(401))
async def models(service: ServiceDep, key_name: KeyName):
    return {"object": "list", "data": [_model(service)]}


@router.get("/v1/models/{model_id:path}", responses=responses(401, 404))
async def model(model_id: str, service: ServiceDep, key_name: KeyName):
    if model_id != service.model_id:
        raise Problem(f"model {model_id!r} is not served here", "model", status=404, code="model_not_found")
    return _model(service)
