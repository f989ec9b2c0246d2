"""The one generation flow every front door uses, free of HTTP:

    request fields (and input images, prepared by inputs.py) -> GenerationSpec (checked against
    the settings) -> the engine -> Image (picture, pasted back into the input when inpainting;
    seed, infotext, safety verdict) -> encoded output (PNG, JPEG or WebP; base64 or a file)

The OpenAI and A1111 routes and the jobs differ only in how they map their fields to a spec and
how they shape the response; everything between is here, and testable without FastAPI.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .engine import Engine, GenParams, GenRequest, pick_seed
from .errors import Cancelled, Problem, TimedOut
from .images import Infotext, encode, encode_png
from .inputs import Source
from .schedulers import UnknownScheduler, resolve
from .settings import Settings

log = logging.getLogger("sdserve.generation")

# Starts waiting for the client to go away: what a front door passes, so the flow knows no HTTP.
Gone = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class GenerationSpec:
    """What to generate, already checked against the settings' limits."""

    prompt: str
    negative_prompt: str
    params: GenParams
    n: int
    seed: int | None = None  # the first image's; image i gets seed + i. None or -1: random
    source: Source | None = None  # image-to-image and inpainting: the input, at the spec's size


def make_spec(
    settings: Settings,
    *,
    prompt: str,
    negative_prompt: str,
    width: int,
    height: int,
    n: int,
    steps: int | None,
    guidance: float | None,
    sampler: str | None,
    schedule: str | None = None,
    seed: int | None = None,
    eta: float | None = None,
    source: Source | None = None,
    strength: float | None = None,
    names: dict[str, str] | None = None,
) -> GenerationSpec:
    """A spec from a front door's fields, checked against the settings' limits. A Problem (422) names
    the field at fault in the API's own words: `names` maps prompt, negative_prompt, width, height,
    n, steps, scheduler, schedule, pixels and strength to them. With a `source` it is image-to-image
    (inpainting when the source has a mask), going `strength` (0-1] of the way from the image."""
    f = {
        k: k for k in ("prompt", "negative_prompt", "width", "height", "n", "steps", "scheduler", "strength")
    }
    f.update({"schedule": "scheduler", "pixels": "size", **(names or {})})
    for text, key in ((prompt, "prompt"), (negative_prompt, "negative_prompt")):
        if len(text) > settings.max_prompt_chars:
            raise Problem(
                f"{f[key]} is {len(text)} characters; the limit is {settings.max_prompt_chars}", f[key]
            )
    for key, value in (("width", width), ("height", height)):
        if value % 8 or not 64 <= value <= settings.max_side:
            raise Problem(
                f"{f[key]}: {key} {value} must be a multiple of 8 between 64 and {settings.max_side}", f[key]
            )
    if not 1 <= n <= settings.max_images:
        raise Problem(f"{f['n']}: {n} images asked; allowed 1 to {settings.max_images}", f["n"])
    if n * width * height > settings.max_pixels:
        raise Problem(
            f"{f['pixels']}: {n} x {width}x{height} = {n * width * height} pixels is above the per-request budget of {settings.max_pixels}",
            f["pixels"],
        )
    steps = settings.default_steps if steps is None else steps
    if not 1 <= steps <= settings.max_steps:
        raise Problem(f"{f['steps']}: {steps} steps; allowed 1 to {settings.max_steps}", f["steps"])
    try:
        choice = resolve(
            sampler or settings.default_scheduler,
            schedule,
            field_name=f["scheduler"],
            schedule_field=f["schedule"],
        )
    except UnknownScheduler as e:
        raise Problem(str(e), f["schedule"] if e.part == "schedule" else f["scheduler"]) from e
    limit = choice.sampler.max_steps
    if limit is not None and steps > limit:
        raise Problem(
            f"{f['steps']}: {steps} steps; {choice.sampler.name} allows at most {limit}", f["steps"]
        )
    if eta is not None and choice.sampler.ancestral and eta != 1.0:
        raise Problem(f"eta: {eta} is not supported with {choice.sampler.name}; only 1.0", "eta")
    guidance = settings.default_guidance if guidance is None else guidance
    mode = "txt2img" if source is None else "img2img" if source.mask is None else "inpaint"
    if source is not None:
        strength = 0.75 if strength is None else float(strength)
        # The pipeline runs int(steps * strength) steps; none would fail it.
        if not 0 < strength <= 1 or int(steps * strength) < 1:
            raise Problem(
                f"{f['strength']}: {strength:g} of {steps} steps runs no step; "
                "it must be in (0, 1] with steps x strength at least 1",
                f["strength"],
            )
    params = GenParams(
        width,
        height,
        steps,
        float(guidance),
        choice,
        bool(negative_prompt),
        eta if choice.sampler.name == "DDIM" else None,
        mode,
        strength if source is not None else None,
    )
    return GenerationSpec(prompt, negative_prompt, params, n, seed, source)


@dataclass(frozen=True)
class Partial:
    """A preview of a request's image number `image` mid-run, the `index`-th of its previews."""

    image: int
    index: int
    picture: Any


@dataclass
class Image:
    """One generated image, with what a response says of it."""

    picture: Any  # a PIL image
    seed: int
    infotext: str  # A1111's "parameters" text, also written into the PNG
    nsfw: bool  # flagged (and blacked out) by the model's safety checker; False without one


def new_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time())}-{secrets.token_hex(8)}"


class Generations:
    """Submit a spec to the engine, wait for its images, encode them."""

    def __init__(self, settings: Settings, engine: Engine, model_id, key_count, png_pool: ThreadPoolExecutor):
        self.settings = settings
        self.engine = engine
        self._model_id = model_id  # () -> str, the loaded model's id
        self._key_count = key_count  # () -> int, keys in force
        self.png_pool = png_pool

    def submit(
        self, spec: GenerationSpec, key_name: str, request_id: str, partials: int = 0, on_partial=None
    ) -> GenRequest:
        first = pick_seed(spec.seed)
        p = spec.params
        extra = {
            "images": spec.n,
            "size": f"{p.width}x{p.height}",
            "steps": p.steps,
            "scheduler": p.scheduler.label,
            "seed": first,
            "key": key_name,
        }
        if self.settings.log_prompts:  # off by default: prompts can be personal data
            extra.update(prompt=spec.prompt, negative_prompt=spec.negative_prompt)
        log.info("generation requested", extra=extra)
        # Shares of the queue matter only between keys: with one key (or none) it may use it all.
        key_limit = self.settings.per_key_limits()[0] if self._key_count() > 1 else None
        return self.engine.submit(
            p,
            spec.prompt,
            spec.negative_prompt,
            [first + i for i in range(spec.n)],
            key_name=key_name,
            request_id=request_id,
            key_queue_limit=key_limit,
            image=spec.source.image if spec.source else None,
            mask=spec.source.mask if spec.source else None,
            partials=partials,
            on_partial=on_partial,
        )

    async def images(self, spec: GenerationSpec, req: GenRequest, generated: list) -> list[Image]:
        """The engine's results as Images, each with its seed and infotext; inpainted ones pasted
        back into the input, so that outside the mask they are the input's pixels."""
        model = self._model_id()
        if spec.source is not None and spec.source.overlay is not None:
            pictures = [await self.off_loop(spec.source.paste_back, g.image) for g in generated]
        else:
            pictures = [g.image for g in generated]
        return [
            Image(
                picture,
                seed,
                str(Infotext(spec.prompt, spec.negative_prompt, spec.params, seed, model)),
                g.nsfw,
            )
            for seed, g, picture in zip(req.seeds, generated, pictures, strict=True)
        ]

    async def wait(self, spec: GenerationSpec, req: GenRequest, gone: Gone | None = None) -> list[Image]:
        """The images of a submitted request. The client going away (what `gone()` returns
        completing) or the request timeout cancels it."""
        result = asyncio.wrap_future(req.future)
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            done, _ = await asyncio.wait(
                {result} | ({watcher} if watcher else set()),
                timeout=self.settings.request_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            result.cancel()  # its caller is gone (a stream closed): nothing will read its outcome
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if result in done:
            return await self.images(spec, req, result.result())
        self.engine.cancel(req)
        result.cancel()
        if watcher is not None and watcher in done:
            log.info("client disconnected; request cancelled")
            raise Cancelled("client disconnected")
        raise TimedOut(
            f"the request did not finish within {self.settings.request_timeout_s:g}s "
            f"({self.settings.name('request_timeout_s')}); use POST /v1/jobs for long work"
        )

    async def run(
        self, spec: GenerationSpec, key_name: str, request_id: str, gone: Gone | None = None
    ) -> list[Image]:
        return await self.wait(spec, self.submit(spec, key_name, request_id), gone)

    def stream(
        self, spec: GenerationSpec, key_name: str, request_id: str, partials: int
    ) -> AsyncIterator[Partial | list[Image]]:
        """Submit a spec now (a full queue raises here, before any answer has begun); the iterator
        yields each preview as the worker takes it (up to `partials` an image), then the images.
        Leaving the iteration early (the client went away) cancels the request."""
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue[Partial] = asyncio.Queue()

        def on_partial(image: int, index: int, picture) -> None:  # on the worker thread
            loop.call_soon_threadsafe(previews.put_nowait, Partial(image, index, picture))

        req = self.submit(spec, key_name, request_id, partials, on_partial)
        return self._stream(spec, req, previews)

    async def _stream(
        self, spec: GenerationSpec, req: GenRequest, previews: asyncio.Queue
    ) -> AsyncIterator[Partial | list[Image]]:
        result = asyncio.ensure_future(self.wait(spec, req))
        try:
            while True:
                getter = asyncio.ensure_future(previews.get())
                done, _ = await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                yield getter.result()
            while not previews.empty():  # taken before the last step, queued behind the result
                yield previews.get_nowait()
            yield result.result()
        finally:
            if not result.done():
                result.cancel()
                self.engine.cancel(req)

    async def png(self, image: Image) -> bytes:
        return await self.off_loop(encode_png, image.picture, image.infotext)

    async def encode(self, image: Image, fmt: str = "png", quality: int | None = None) -> bytes:
        return await self.off_loop(encode, image.picture, image.infotext, fmt, quality)

    async def b64(self, image: Image, fmt: str = "png", quality: int | None = None) -> str:
        return base64.b64encode(await self.encode(image, fmt, quality)).decode("ascii")

    async def b64_png(self, image: Image) -> str:
        return await self.b64(image)

    async def save(
        self, image: Image, prefix: str = "img", data: bytes | None = None, fmt: str = "png", quality=None
    ) -> str:
        """Write the image (encoded here unless given) into OUTPUT_DIR under a new random name (the
        capability a URL carries); returns the name."""
        name = f"{new_id(prefix)}.{fmt}"
        data = data if data is not None else await self.encode(image, fmt, quality)
        await self.off_loop(_write, self.settings.output_dir / name, data)
        return name

    async def off_loop(self, fn, *args):
        """Run PIL work (encoding, decoding, pasting) in the image pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.png_pool, fn, *args)


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
