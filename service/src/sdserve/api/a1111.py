"""AUTOMATIC1111-compatible API: POST /sdapi/v1/txt2img, /img2img (inpainting with a mask),
/png-info, /interrupt and /skip, and the discovery routes clients call.

Clients such as `webuiapi` send every A1111 field with its default. Each field is
honoured, accepted at its default (or ignored where A1111 ignores it, e.g. the
hires-fix fields while enable_hr is false), or refused with a 422 naming it.
"""

from __future__ import annotations

import base64
import json
import time
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from .. import __version__
from ..engine import MAX_SEED
from ..errors import BODY, Problem, responses
from ..generation import GenerationSpec, make_spec
from ..images import parse_infotext, read_infotext
from ..inputs import b64_bytes, binary_mask, img2img_source, inpaint_source, open_image
from ..schedulers import SAMPLERS, SCHEDULES
from ..service import Service
from ..validation import RequestModel, check_texts
from .deps import KeyName, RequestId, ServiceDep, client_gone

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])


class Txt2ImgRequest(RequestModel):
    """Every field of A1111's txt2img, typed as A1111 types it, so that what this service ignores is
    still checked (a NaN there must not reach the JSON it echoes). Unknown fields are accepted only
    empty; see check_unsupported."""

    model_config = ConfigDict(extra="allow")

    # Honoured.
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    width: int | None = Field(None, ge=1, description="Omitted: the model's native size.")
    height: int | None = Field(None, ge=1, description="Omitted: the model's native size.")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="Deprecated alias of sampler_name.")
    scheduler: str | None = None
    eta: float | None = Field(None, ge=0, le=1)
    send_images: bool = True
    save_images: bool = False
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # Accepted with any value: they change nothing here (enable_hr is refused when true).
    override_settings_restore_afterwards: bool = True
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    enable_hr: bool = False
    # Accepted only at their defaults (AT_DEFAULT).
    restore_faces: bool | None = None
    tiling: bool | None = None
    subseed_strength: float | None = None
    seed_resize_from_h: int | None = None
    seed_resize_from_w: int | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    styles: list[str] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = None
    firstpass_image: str | None = None
    # Ignored whatever their value, as A1111 ignores them unless enable_hr is on, or because they
    # only name things (subseed without strength, comments, task ids); still type-checked.
    denoising_strength: float | None = Field(None, ge=0, le=1)
    firstphase_width: int | None = Field(None, ge=0)
    firstphase_height: int | None = Field(None, ge=0)
    hr_scale: float | None = Field(None, ge=0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = Field(None, ge=0)
    hr_resize_x: int | None = Field(None, ge=0)
    hr_resize_y: int | None = Field(None, ge=0)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_additional_modules: list[str] | None = None
    subseed: int | None = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    infotext: str | None = None
    user: str | None = None
    include_init_images: bool | None = None


# Fields accepted only at these values (A1111's and webuiapi's defaults).
AT_DEFAULT: dict[str, tuple] = {
    "restore_faces": (None, False),
    "tiling": (None, False),
    "subseed_strength": (None, 0),
    "seed_resize_from_h": (None, -1, 0),
    "seed_resize_from_w": (None, -1, 0),
    "s_min_uncond": (None, 0),
    "s_churn": (None, 0),
    "s_tmin": (None, 0),
    "s_tmax": (None, 0),
    "s_noise": (None, 1),
    "styles": (None, []),
    "script_name": (None, ""),
    "script_args": (None, []),
    "alwayson_scripts": (None, {}),
    "refiner_checkpoint": (None, ""),
    "refiner_switch_at": (None, 0),
    "disable_extra_networks": (None, False),
    "firstpass_image": (None, ""),
}


def _empty(value: Any) -> bool:
    return value in (None, False, 0, "", [], {})


def check_unsupported(service: Service, body: Txt2ImgRequest) -> None:
    if body.enable_hr:
        raise Problem(
            "enable_hr: hires fix is not supported by this service; generate at the target size instead",
            "enable_hr",
        )
    for name, allowed in AT_DEFAULT.items():
        value = getattr(body, name)
        if value not in allowed:
            raise Problem(
                f"{name}: not supported by this service; leave it at its default {allowed[-1]!r}", name
            )
    for name, value in (body.model_extra or {}).items():
        if not _empty(value):
            raise Problem(f"{name}: unknown or unsupported field (set to {value!r})", name)
    for key, value in body.override_settings.items():
        if key == "sd_model_checkpoint" and value in (service.model_id, title(service)):
            continue
        if key == "CLIP_stop_at_last_layers" and value == 1:
            continue
        if key == "samples_format" and value == "png":
            continue
        raise Problem(
            f"override_settings.{key}: cannot be changed on this service (got {value!r})",
            f"override_settings.{key}",
        )
    if body.save_images and service.settings.output_dir is None:
        raise Problem(
            f"save_images: off on this server (it needs {service.settings.name('output_dir')})", "save_images"
        )


def title(service: Service) -> str:
    rev = service.settings.model_revision
    return f"{service.model_id} [{rev[:10]}]" if rev else service.model_id


def spec_of(service: Service, body: Txt2ImgRequest) -> GenerationSpec:
    """The request as a generation spec; a Problem names the field at fault."""
    check_unsupported(service, body)
    return make_spec(
        service.settings,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=body.width or service.native_size[0],
        height=body.height or service.native_size[1],
        n=body.batch_size * body.n_iter,
        steps=body.steps,
        guidance=body.cfg_scale,
        sampler=body.sampler_name or body.sampler_index,
        schedule=body.scheduler,
        seed=body.seed,
        eta=body.eta,
        names={
            "n": "batch_size",
            "pixels": "batch_size",
            "scheduler": "sampler_name",
            "schedule": "scheduler",
        },
    )


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img: txt2img's fields plus the input image and, for inpainting, its mask."""

    init_images: list[str] = Field(
        min_length=1, max_length=1, description="One base64 PNG, JPEG or WebP image (a data: URL too)."
    )
    denoising_strength: float = Field(0.75, ge=0, le=1, description="How far from the image to go.")
    resize_mode: int = Field(
        0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill; 3 refused."
    )
    image_cfg_scale: float | None = Field(
        None, description="Ignored, as A1111 ignores it but for pix2pix models."
    )
    mask: str | None = Field(None, description="Base64 mask, the image's size: white (or opaque) repaints.")
    mask_blur: int = Field(4, ge=0, le=64, description="Gaussian blur of the mask's edge, in pixels.")
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original; 2 and 3 (latent) refused.")
    inpaint_full_res: bool = Field(True, description="Only masked: inpaint a crop around the mask.")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint where the mask is black.")
    # Accepted only at their defaults (IMG2IMG_AT_DEFAULT).
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    mask_round: bool | None = None
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None


IMG2IMG_AT_DEFAULT: dict[str, tuple] = {
    "mask_blur_x": (None, 4),
    "mask_blur_y": (None, 4),
    "mask_round": (None, True),
    "initial_noise_multiplier": (None, 1),
    "latent_mask": (None, ""),
    "include_init_images": (None, False),
    "resize_mode": (0, 1, 2),
    "inpainting_fill": (0, 1),
}


async def img2img_spec(service: Service, body: Img2ImgRequest) -> GenerationSpec:
    """The request, its image decoded and prepared, as a spec; a Problem names the field at fault."""
    for name, allowed in IMG2IMG_AT_DEFAULT.items():
        if getattr(body, name) not in allowed:
            supported = ", ".join(repr(a) for a in allowed if a is not None)
            raise Problem(f"{name}: {getattr(body, name)!r} is not supported here (only {supported})", name)
    spec = spec_of(service, body)  # every other field checked before any image is decoded
    p, limit = spec.params, service.settings.max_pixels

    def prepare():
        image = open_image(b64_bytes(body.init_images[0], "init_images.0"), "init_images.0", limit)
        if not body.mask:
            return img2img_source(image, p.width, p.height, body.resize_mode)
        mask = open_image(b64_bytes(body.mask, "mask"), "mask", limit)
        if mask.size != image.size:
            raise Problem(
                f"mask: {mask.width}x{mask.height}, but the image is {image.width}x{image.height}", "mask"
            )
        return inpaint_source(
            image,
            binary_mask(mask, invert=bool(body.inpainting_mask_invert)),
            p.width,
            p.height,
            resize_mode=body.resize_mode,
            blur=body.mask_blur,
            fill_masked=body.inpainting_fill == 0,
            only_masked=body.inpaint_full_res,
            padding=body.inpaint_full_res_padding,
        )

    source = await service.generations.off_loop(prepare)
    return make_spec(
        service.settings,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=p.width,
        height=p.height,
        n=spec.n,
        steps=p.steps,
        guidance=body.cfg_scale,
        sampler=body.sampler_name or body.sampler_index,
        schedule=body.scheduler,
        seed=body.seed,
        eta=body.eta,
        source=source,
        strength=body.denoising_strength,
        names={"strength": "denoising_strength"},
    )


@router.post("/txt2img", responses=responses(*BODY, 401, 429, 500, 503, 504, a1111=True))
async def txt2img(
    body: Txt2ImgRequest, service: ServiceDep, key_name: KeyName, request_id: RequestId, request: Request
):
    spec = spec_of(service, body)
    return await answer(service, body, spec, key_name, request_id, request)


@router.post("/img2img", responses=responses(*BODY, 401, 429, 500, 503, 504, a1111=True))
async def img2img(
    body: Img2ImgRequest, service: ServiceDep, key_name: KeyName, request_id: RequestId, request: Request
):
    """Image-to-image, or inpainting with `mask`: outside the (blurred) mask the result keeps the
    input's pixels, as A1111 pastes it back."""
    spec = await img2img_spec(service, body)
    return await answer(service, body, spec, key_name, request_id, request)


async def answer(
    service: Service,
    body: Txt2ImgRequest,
    spec: GenerationSpec,
    key_name: str,
    request_id: str,
    request: Request,
) -> dict:
    """Run the spec; A1111's response body: the images, the parameters as run, the info."""
    generations = service.generations
    images = await generations.run(spec, key_name, request_id, partial(client_gone, request))
    pngs = [await generations.png(image) for image in images]
    if body.save_images:
        for image, png in zip(images, pngs, strict=True):
            await generations.save(image, "a1111", png)
    p, n, seeds = spec.params, spec.n, [image.seed for image in images]
    info = {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * n,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * n,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": p.width,
        "height": p.height,
        "sampler_name": p.scheduler.sampler.name,
        "scheduler": p.scheduler.schedule.label,
        "cfg_scale": p.guidance,
        "steps": p.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "restore_faces": False,
        "sd_model_name": service.model_id,
        "sd_model_hash": service.settings.model_revision or None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": p.strength,
        "extra_generation_params": {"Schedule type": p.scheduler.schedule.label},
        "index_of_first_image": 0,
        "infotexts": [image.infotext for image in images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"sdserve {__version__}",
    }
    if service.settings.safety_checker:
        info["nsfw_content_detected"] = [image.nsfw for image in images]
    # The request as it ran: declared fields only (extras are empty or refused), the resolved
    # sampler and schedule type under the same names as in info.
    parameters = body.model_dump(exclude={*(body.model_extra or ()), "init_images", "mask"})
    parameters.update(
        steps=p.steps,
        sampler_name=p.scheduler.sampler.name,
        sampler_index=p.scheduler.sampler.name,
        scheduler=p.scheduler.schedule.label,
    )
    images_b64 = [base64.b64encode(png).decode("ascii") for png in pngs] if body.send_images else []
    return {"images": images_b64, "parameters": parameters, "info": json.dumps(info)}


@router.get("/samplers", responses=responses(401, a1111=True))
async def samplers(key_name: KeyName):
    return [
        {"name": s.name, "aliases": list(s.aliases), "options": {"scheduler": s.default_schedule}}
        for s in SAMPLERS
    ]


@router.get("/schedulers", responses=responses(401, a1111=True))
async def schedulers(key_name: KeyName):
    return [
        {"name": s.name, "label": s.label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for s in SCHEDULES
    ]


@router.get("/sd-models", responses=responses(401, a1111=True))
async def sd_models(service: ServiceDep, key_name: KeyName):
    path = service.settings.model
    return [
        {
            "title": title(service),
            "model_name": service.model_id,
            "hash": service.settings.model_revision[:10] or None,
            "sha256": None,
            "filename": str(path.resolve()) if path else "",
            "config": None,
        }
    ]


def current_options(service: Service) -> dict[str, Any]:
    """The A1111 options this instance runs with; none can change."""
    return {
        "sd_model_checkpoint": title(service),
        "sd_checkpoint_hash": service.settings.model_revision or None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
    }


@router.get("/options", responses=responses(401, a1111=True))
async def get_options(service: ServiceDep, key_name: KeyName):
    return current_options(service)


@router.post("/options", responses=responses(*BODY, 401, a1111=True))
async def set_options(body: dict[str, Any], service: ServiceDep, key_name: KeyName):
    """Only no-op changes: one model per process, chosen by the operator."""
    check_texts(body)
    current = current_options(service)
    for key, value in body.items():
        if key == "sd_model_checkpoint" and value in (service.model_id, title(service)):
            continue
        if current.get(key, object()) != value:
            raise Problem(f"{key}: options cannot be changed on this service (got {value!r})", key)
    return None


@router.get("/progress", responses=responses(401, a1111=True))
async def progress(service: ServiceDep, key_name: KeyName):
    engine = service.engine
    batch = engine.running
    steps, step = (batch.params.steps, batch.step) if batch else (0, 0)
    eta = (time.time() - batch.started) / step * (steps - step) if batch and step else 0.0
    return {
        "progress": round(step / steps, 4) if steps else 0.0,
        "eta_relative": round(eta, 3),
        "state": {
            "skipped": False,
            "interrupted": bool(batch and batch.interrupted),
            "stopping_generation": False,
            "job": ("txt2img" if batch.params.mode == "txt2img" else "img2img") if batch else "",
            "job_count": engine.queue_depth + (1 if engine.busy else 0),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(batch.started if batch else None)),
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": None,
        "textinfo": None,
    }


class PngInfoRequest(RequestModel):
    image: str = Field(description="Base64 PNG, JPEG or WebP (a data: URL too).")


@router.post("/png-info", responses=responses(*BODY, 401, a1111=True))
async def png_info(body: PngInfoRequest, service: ServiceDep, key_name: KeyName):
    """The generation parameters an image carries (PNG text chunk, or EXIF UserComment), raw and
    parsed as A1111 parses them, and its other text items."""
    limit = service.settings.max_pixels

    def read():
        info, items = read_infotext(open_image(b64_bytes(body.image.strip(), "image"), "image", limit))
        return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}

    return await service.generations.off_loop(read)


@router.post("/interrupt", responses=responses(401, a1111=True))
async def interrupt(service: ServiceDep, key_name: KeyName):
    """Stop the running batch at its next step: its requests are answered with their images as that
    step left them. Only the caller's key's requests are stopped; a batch shared with another key's
    runs on. Images of a request that were not in the batch still run."""
    service.engine.interrupt(key_name if len(service.keys) > 1 else None)
    return {}


@router.post("/skip", responses=responses(401, a1111=True))
async def skip(service: ServiceDep, key_name: KeyName):
    """A1111 skips to the job's next batch; here that is what /interrupt does."""
    return await interrupt(service, key_name)


@router.get("/scripts", responses=responses(401, a1111=True))
async def scripts(key_name: KeyName):
    return {"txt2img": [], "img2img": []}
