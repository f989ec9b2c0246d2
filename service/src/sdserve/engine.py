"""The engine: one worker thread owns the pipeline; requests wait in a bounded queue.

Testable without HTTP: `Engine(settings).start()`, then `submit(...)` returns a
request whose `future` (a concurrent.futures.Future) resolves to PIL images.

Batching: when the worker is idle, the oldest request starts at once (optionally
after `batch_wait_ms`; or, right after a batch of several requests, once as many are back
or `batch_rejoin_ms` has passed); every queued request that agrees on its GenParams (size,
steps, guidance, scheduler, whether it has a negative prompt, the mode and strength) joins it,
up to `max_batch` images. Image-to-image and inpainting requests each bring their own image
(and mask); they run on pipelines made from the loaded one's components (`from_pipe`).
Each image has its own torch.Generator seeded with its own seed, so an image does
not depend on its batch-mates.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import gc
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    Cancelled,
    Draining,
    EngineError,
    GenerationFailed,
    InputFailed,
    KeyQueueFull,
    NotReady,
    OutOfMemory,
    QueueFull,
)
from .metrics import Metrics
from .model import LoadedModel, ModelError, load_pipeline
from .schedulers import SchedulerChoice, resolve
from .settings import Settings

log = logging.getLogger("sdserve.engine")

MAX_SEED = 2**32 - 1

__all__ = [  # the engine's errors, defined with every other error in errors.py
    "Cancelled",
    "Draining",
    "EngineError",
    "GenerationFailed",
    "InputFailed",
    "KeyQueueFull",
    "NotReady",
    "OutOfMemory",
    "QueueFull",
]


class EngineState(str, enum.Enum):
    """Where the engine is in its life; compares equal to its value ("ready")."""

    CREATED = "created"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class Phase(str, enum.Enum):
    """What the worker is doing."""

    IDLE = "idle"
    GATHERING = "gathering"  # in a batch wait or rejoin window
    RUNNING = "running"

    def __str__(self) -> str:
        return self.value


# States from which a drain starts refusing work.
_RUNNING = (EngineState.CREATED, EngineState.LOADING, EngineState.WARMING, EngineState.READY)


# Errors a pipeline raises on what it was given (a tokenizer on odd text, a shape it cannot make):
# when one request fails alone with one of these, the fault is its input, and it gets a 4xx.
INPUT_ERRORS = (ValueError, TypeError, IndexError, KeyError, OverflowError)


@dataclass(frozen=True)
class GenParams:
    """What a batch's members must agree on."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: SchedulerChoice
    has_negative: bool = False
    eta: float | None = None
    mode: str = "txt2img"  # or "img2img", "inpaint": which pipeline runs
    strength: float | None = None  # img2img and inpaint: how far from the input image to go

    @property
    def denoise_steps(self) -> int:
        """Steps the pipeline runs: image-to-image skips the first (1 - strength) of them."""
        if self.strength is None:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)


@dataclass(eq=False)
class Batch:
    """One pipeline call: the progress every request in it reads."""

    params: GenParams
    images: int
    step: int = 0
    started: float = field(default_factory=time.time)
    interrupted: bool = False  # stopped early by interrupt(): its images are as the step left them


@dataclass
class Generated:
    """A finished image: the picture, and whether the model's safety checker flagged it (its
    pipeline has then blacked it out); always False without a safety checker."""

    image: Any
    nsfw: bool = False


@dataclass(eq=False)
class GenRequest:
    params: GenParams
    prompt: str
    negative_prompt: str
    seeds: list[int]
    key_name: str = "-"
    request_id: str = "-"
    image: Any = None  # img2img and inpaint: the RGB image at the batch's size
    mask: Any = None  # inpaint: the L mask at the batch's size, white repainted
    partials: int = 0  # previews wanted per image, evenly spread over the steps (streaming)
    # Called on the worker with (image, preview index, picture) for each preview.
    on_partial: Callable[[int, int, Any], None] | None = None
    future: Future = field(default_factory=Future)  # resolves to list[Generated]
    images: list[Generated | None] = field(default_factory=list)
    taken: int = 0  # images handed to the worker so far
    done: int = 0
    batch: Batch | None = None  # the last batch it was in
    cancelled: bool = False
    interrupted: bool = False  # its key asked the running batch to stop (A1111's interrupt)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None

    def __post_init__(self) -> None:
        self.images = [None] * len(self.seeds)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def succeeded(self) -> bool:
        return self.future.done() and not self.future.cancelled() and self.future.exception() is None

    @property
    def step(self) -> int:
        """The denoising step its images in flight have reached (0 before any ran)."""
        return self.batch.step if self.batch is not None and self.taken > self.done else 0

    @property
    def progress(self) -> float:
        """Fraction done; a failed or cancelled request keeps the fraction it reached."""
        if self.succeeded:
            return 1.0
        in_flight = (self.taken - self.done) * self.step / self.params.steps
        return (self.done + in_flight) / self.n


# Peak memory of an SD-style VAE decoder per output pixel in half precision, generously rounded
# up (about 1.5 GiB for one 512x512 image); an underestimate costs an out-of-memory retry.
VAE_DECODE_BYTES_PER_PIXEL = 6144


def vae_slicing_needed(device: str, images: int, width: int, height: int, free_bytes: int) -> bool:
    """Decode one image at a time only when the batch would not fit: a batched decode is much faster
    on a GPU with room for it. On CPU, slicing above 4 images bounds the process's peak memory."""
    if device != "cuda":
        return images > 4
    return images > 1 and images * width * height * VAE_DECODE_BYTES_PER_PIXEL > free_bytes // 2


def cuda_free() -> int:
    """Bytes the next allocations can use: free on the device plus what torch holds unused."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def pick_seed(seed: int | None) -> int:
    """-1 or None picks a random seed (and the response reports it)."""
    return secrets.randbelow(MAX_SEED + 1) if seed is None or seed < 0 else seed


def partial_steps(partials: int, steps: int) -> list[int]:
    """The steps after which previews are taken: spread evenly, never the last (the image itself
    follows), so a run of few steps gives fewer previews than asked, as OpenAI allows."""
    return sorted({round((m + 1) * steps / (partials + 1)) for m in range(partials)} - {0, steps})


# An SD latent's 4 channels to RGB, a linear fit (ComfyUI's SD1.5 preview factors): a preview at no
# VAE cost, good enough to show composition and colour mid-run.
_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_preview(latent, width: int, height: int):
    """A rough picture of one image's latent (4 x h x w), scaled to the output size."""
    import torch
    from PIL import Image

    factors = torch.tensor(_LATENT_RGB, dtype=torch.float32)
    x = latent.detach().float().cpu()
    if x.shape[0] != factors.shape[0]:  # another latent space: a grey preview rather than a wrong one
        x = torch.zeros((4, *x.shape[1:]))
    rgb = torch.einsum("chw,cr->hwr", x, factors).add(1).div(2).clamp(0, 1).mul(255).to(torch.uint8)
    return Image.fromarray(rgb.numpy()).resize((width, height), Image.BILINEAR)


class Engine:
    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, model: LoadedModel | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(settings.max_batch)
        self.model = model
        self.state = EngineState.CREATED
        self.error: str | None = None
        self._queue: collections.deque[GenRequest] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[GenRequest] = []
        self.running: Batch | None = None  # the pipeline call in progress
        self._pipes: dict[str, Any] = {}  # image-to-image and inpainting pipelines, made on first use
        self.last_batch: Batch | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.on_failure: Callable[[str], None] | None = None
        # Test hook, not a setting: called with the image count before every pipeline call,
        # warm-up included, on the worker thread. Tests use it to inject an out-of-memory
        # error or to hold the worker. Nothing in production sets it.
        self.before_pipeline_call: Callable[[int], None] | None = None
        self.phase = Phase.IDLE
        # (params, requests, monotonic end) of the last batch, for the rejoin window.
        self._last_batch: tuple[GenParams, int, float] | None = None
        self.metrics.watch_engine(self)

    # lifecycle ----------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._main, name="sdserve-engine", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.ready

    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY

    def refuse_new(self) -> None:
        with self._cond:
            if self.state in _RUNNING:
                self.state = EngineState.DRAINING

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self._queue and not self._running

    def abort(self, err: EngineError) -> int:
        """Fail every queued and running request with `err`; a running batch stops at its next
        step. Returns how many requests were failed."""
        with self._cond:
            left = list({id(r): r for r in [*self._queue, *self._running]}.values())
            self._queue.clear()
            for req in left:
                req.cancelled = True
            self._cond.notify_all()
        for req in left:
            self._fail(req, err)
        return len(left)

    def stop(self, timeout: float | None = None) -> bool:
        """Let the worker finish what is queued, then end; True once the worker has ended."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def drain(self, timeout: float | None = None, grace: float = 10.0) -> bool:
        """Refuse new work and finish what is queued and running within `timeout`; past it, fail
        the rest with Draining (503), stop the running batch at its next step, and give the worker
        `grace` seconds to end. Returns False when work had to be failed."""
        self.refuse_new()
        clean = self.stop(timeout)
        if not clean:
            failed = self.abort(Draining("the service stopped before this request finished; retry"))
            log.warning("drain timeout passed: %d requests failed with 503", failed)
            if not self.stop(grace):
                log.error("the worker did not stop within %gs of the drain timeout", grace)
        return clean

    def _main(self) -> None:
        try:
            if self.model is None:
                self.state = EngineState.LOADING
                self.model = load_pipeline(self.settings)
            if self.model.scheduler_config is None:
                self.model.scheduler_config = dict(self.model.pipe.scheduler.config)
            self._base_scheduler_config = self.model.scheduler_config
            self.state = EngineState.WARMING
            self._warm_up()
            with self._cond:
                if self.state == EngineState.WARMING and not self._stop:  # a drain may have begun
                    self.state = EngineState.READY
        except Exception as e:  # start-up failure: reported, then the process exits non-zero
            self._failed(str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}")
            log.error("start-up failed: %s", self.error, exc_info=not isinstance(e, ModelError))
            return
        finally:
            self._ready.set()
        try:
            self._loop()
        except Exception as e:  # a bug in the engine: say so on /livez, so the supervisor restarts us
            log.exception("engine worker died")
            self.abort(GenerationFailed(f"engine worker died: {type(e).__name__}"))
            self._failed(f"engine worker died: {type(e).__name__}: {e}")
            return
        with self._cond:
            self.state = EngineState.STOPPED

    def _failed(self, error: str) -> None:
        self.error = error
        self.state = EngineState.FAILED
        if self.on_failure:
            self.on_failure(error)

    def _warm_up(self) -> None:
        sizes = self.settings.warmup_size_list() or [self.model.native_size]
        batches = [1] + (
            [self.settings.max_batch] if self.settings.compile and self.settings.max_batch > 1 else []
        )
        choice = resolve(self.settings.default_scheduler)
        for w, h in sizes:
            for b in batches:
                t = time.monotonic()
                params = GenParams(w, h, self.settings.warmup_steps, self.settings.default_guidance, choice)
                req = GenRequest(params, "warm-up", "", list(range(b)), key_name="warm-up")
                self._call_pipeline([(req, i) for i in range(b)])
                log.info("warm-up %dx%d batch %d took %.2fs", w, h, b, time.monotonic() - t)

    # submission -----------------------------------------------------------------
    def submit(
        self,
        params: GenParams,
        prompt: str,
        negative_prompt: str,
        seeds: list[int],
        *,
        key_name: str = "-",
        request_id: str = "-",
        key_queue_limit: int | None = None,
        image: Any = None,
        mask: Any = None,
        partials: int = 0,
        on_partial: Callable[[int, int, Any], None] | None = None,
    ) -> GenRequest:
        """Queue a request. `key_queue_limit`: most requests one key may have waiting. `image` (and
        `mask`): what params.mode img2img (inpaint) starts from, at params' size. `on_partial` gets up to
        `partials` previews of each image, decoded cheaply from the latents mid-run."""
        if (image is None) != (params.mode == "txt2img") or (mask is None) != (params.mode != "inpaint"):
            raise ValueError(f"mode {params.mode} with image={image is not None}, mask={mask is not None}")
        req = GenRequest(
            params,
            prompt,
            negative_prompt,
            seeds,
            key_name=key_name,
            request_id=request_id,
            image=image,
            mask=mask,
            partials=partials,
            on_partial=on_partial,
        )
        with self._cond:
            if self.state == EngineState.DRAINING or self._stop:
                self.metrics.rejected.labels("draining").inc()
                raise Draining("the service is shutting down; retry on another node")
            if self.state != EngineState.READY:
                self.metrics.rejected.labels("not_ready").inc()
                raise NotReady(f"the model is not ready yet (state: {self.state})")
            if self.queue_full:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(
                    f"the queue is full ({self.settings.queue_size} requests waiting, "
                    f"{self.settings.name('queue_size')}); retry later"
                )
            if key_queue_limit is not None:
                waiting = sum(1 for r in self._queue if r.key_name == key_name)
                if waiting >= key_queue_limit:
                    self.metrics.rejected.labels("key_queue_full").inc()
                    raise KeyQueueFull(
                        f"this key has {waiting} requests waiting, its limit "
                        f"({self.settings.name('max_queued_per_key')}); retry later"
                    )
            self._queue.append(req)
            self._cond.notify_all()
        return req

    def cancel(self, req: GenRequest) -> None:
        """Drop a request: removed if still queued; a running batch whose requests are
        all cancelled is interrupted at the next step."""
        with self._cond:
            req.cancelled = True
            if req in self._queue and req.taken == 0:
                self._queue.remove(req)
                req.image = req.mask = None  # never reaches the worker
                self._cond.notify_all()  # a worker waiting for this request's batch-mates re-checks
        if not req.future.done():
            self._fail(req, Cancelled("cancelled"))

    def interrupt(self, key_name: str | None = None) -> int:
        """A1111's interrupt (and skip): the running batch stops at its next step and its images come
        back as that step left them. Only `key_name`'s requests (None: all) are marked; a batch shared
        with another key's requests runs on. Returns how many requests were marked."""
        with self._cond:
            mine = [r for r in self._running if key_name is None or r.key_name == key_name]
            for req in mine:
                req.interrupted = True
        return len(mine)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queue_full(self) -> bool:
        """A new request would be refused with 429 (QueueFull)."""
        return len(self._queue) >= self.settings.queue_size

    @property
    def busy(self) -> bool:
        return bool(self._running)

    # worker ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self.phase = Phase.IDLE
                    self._cond.wait()
                if not self._queue:
                    return  # stopping, nothing left
                window = self._gather_window()
                if window:
                    deadline, want_requests = window
                    self.phase = Phase.GATHERING
                    gather_started = time.monotonic()
                    while (
                        self._queue  # a cancel may empty it while we wait
                        and not self._stop
                        and not self._enough_company(want_requests)
                    ):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    kind = "wait" if want_requests is None else "rejoin"
                    self.metrics.gather_seconds.labels(kind).observe(time.monotonic() - gather_started)
                    if not self._queue:
                        continue
                items = self._take_batch()
                self.phase = Phase.RUNNING
            if items:
                self._run(items)
                for req in {id(r): r for r, _ in items}.values():
                    if req.future.done():  # a finished job must not hold its input images until it expires
                        req.image = req.mask = None
                requests = len({id(r) for r, _ in items})
                self._last_batch = (items[0][0].params, requests, time.monotonic())

    def _gather_window(self) -> tuple[float, int | None] | None:
        """When to stop waiting for batch-mates, and how many requests are enough (None: a full
        batch). None: start at once. Called with the lock held and the queue not empty."""
        now = time.monotonic()
        if self.settings.batch_wait_ms > 0:
            return now + self.settings.batch_wait_ms / 1000, None
        # Rejoin: clients answered by a batch of several requests come back within milliseconds
        # (PNG, HTTP). Starting on the first one back splits closed-loop load into a batch of 1
        # and one of the rest; waiting briefly for as many as last time keeps batches full.
        # A request after a lone one, after idle or with other parameters never waits.
        last = self._last_batch
        if last is None or self.settings.batch_rejoin_ms <= 0:
            return None
        params, requests, ended = last
        deadline = ended + self.settings.batch_rejoin_ms / 1000
        if requests < 2 or params != self._queue[0].params or deadline <= now:
            return None
        return deadline, requests

    def _enough_company(self, want_requests: int | None) -> bool:
        head = self._queue[0].params
        mates = [r for r in self._queue if r.params == head]
        if sum(r.n - r.taken for r in mates) >= self.settings.max_batch:
            return True
        return want_requests is not None and len(mates) >= want_requests

    def _take_batch(self) -> list[tuple[GenRequest, int]]:
        head = self._queue[0].params
        room = self.settings.max_batch
        items: list[tuple[GenRequest, int]] = []
        now = time.monotonic()
        for req in list(self._queue):
            if room == 0:
                break
            if req.params != head:
                continue
            count = min(room, req.n - req.taken)
            items += [(req, i) for i in range(req.taken, req.taken + count)]
            if req.started_at is None:
                req.started_at = now
                self.metrics.queue_seconds.observe(now - req.enqueued_at)
            req.taken += count
            room -= count
            if req.taken == req.n:
                self._queue.remove(req)
        return items

    def _run(self, items: list[tuple[GenRequest, int]]) -> None:
        """Run a batch; on out-of-memory empty the cache and retry in halves."""
        items = [it for it in items if not it[0].cancelled]
        if not items:
            return
        import torch

        try:
            self._running = list({id(r): r for r, _ in items}.values())
            images, nsfw, seconds = self._call_pipeline(items)
        except torch.OutOfMemoryError:
            self.metrics.oom.inc()
            self._running = []
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            ids = sorted({r.request_id for r, _ in items})
            log.warning(
                "out of memory at batch %d; retrying in halves", len(items), extra={"request_ids": ids}
            )
            if len(items) == 1:
                req = items[0][0]
                self.metrics.failures.labels("out_of_memory").inc()
                p = req.params
                self._fail(
                    req,
                    OutOfMemory(
                        f"out of GPU memory generating one {p.width}x{p.height} image; try a smaller size"
                    ),
                )
                return
            half = len(items) // 2
            self._run(items[:half])
            self._run(items[half:])
            return
        except Exception as e:
            self._running = []
            distinct = list({id(r): r for r, _ in items}.values())
            if len(distinct) > 1:
                # One request's input can fail a whole batch (a tokenizer on odd text): run each
                # request alone, so that only the culprit fails.
                log.warning(
                    "a batch of %d requests failed (%s); running each alone",
                    len(distinct),
                    type(e).__name__,
                    extra={"request_ids": sorted(r.request_id for r in distinct)},
                )
                for req in distinct:
                    self._run([it for it in items if it[0] is req])
                return
            req = distinct[0]
            own_input = isinstance(e, INPUT_ERRORS)
            self.metrics.failures.labels("input" if own_input else "error").inc()
            # The exception's text may quote the input: the log gets its type (and, for what is
            # not an input error, the traceback), never the prompt.
            log.error(
                "generation failed: %s",
                type(e).__name__,
                exc_info=not own_input,
                extra={"request_ids": [req.request_id]},
            )
            if own_input:
                err: EngineError = InputFailed(
                    f"this request's input could not be generated ({type(e).__name__}); check the prompt and parameters"
                )
            else:
                err = GenerationFailed(f"generation failed: {type(e).__name__}")
            self._fail(req, err)
            return
        finally:
            self._running = []
        self.metrics.batch_size.observe(len(items))
        self.metrics.generation_seconds.observe(seconds)
        steps = items[0][0].params.steps
        if seconds > 0:
            self.metrics.steps_per_second.set(steps / seconds)
            self.metrics.image_steps_per_second.set(steps * len(items) / seconds)
        for (req, i), img, flag in zip(items, images, nsfw, strict=True):
            if req.future.done():
                continue
            req.images[i] = Generated(img, flag)
            req.done += 1
            self.metrics.images.labels(req.key_name).inc()
            if req.done == req.n:
                with contextlib.suppress(InvalidStateError):
                    req.future.set_result(req.images)

    def _fail(self, req: GenRequest, err: Exception) -> None:
        with self._cond:
            if req in self._queue:
                self._queue.remove(req)
        if not req.future.done():
            # The worker and the event loop may both finish a request; the first one wins.
            with contextlib.suppress(InvalidStateError):
                req.future.set_exception(err)

    def pipeline(self, mode: str):
        """The pipeline for a mode: image-to-image and inpainting ones are made once, on the worker,
        from the loaded pipeline's components (the same objects: no second copy of the weights)."""
        if mode == "txt2img":
            return self.model.pipe
        if mode not in self._pipes:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            auto = AutoPipelineForImage2Image if mode == "img2img" else AutoPipelineForInpainting
            pipe = auto.from_pipe(self.model.pipe)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[mode] = pipe
        return self._pipes[mode]

    def _call_pipeline(self, items: list[tuple[GenRequest, int]]):
        import torch

        p = items[0][0].params
        pipe = self.pipeline(p.mode)
        reqs = [r for r, _ in items]
        distinct = list({id(r): r for r in reqs}.values())
        # CPU generators: the same seed gives the same noise on every device and batch size.
        generators = [torch.Generator(device="cpu").manual_seed(r.seeds[i]) for r, i in items]
        # A fresh scheduler per call: schedulers keep per-call state.
        pipe.scheduler = p.scheduler.build(self._base_scheduler_config)
        vae = getattr(pipe, "vae", None)
        if vae is not None and hasattr(vae, "enable_tiling"):
            big = self.settings.vae_tiling_pixels and p.width * p.height > self.settings.vae_tiling_pixels
            vae.enable_tiling() if big else vae.disable_tiling()
            slice_ = big or vae_slicing_needed(self.model.device, len(items), p.width, p.height, cuda_free())
            vae.enable_slicing() if slice_ else vae.disable_slicing()
        batch = Batch(p, len(items))
        for r in distinct:
            r.batch = batch

        skipped = p.steps - p.denoise_steps  # image-to-image starts part-way: those count as done
        watched = [
            (row, r, i, partial_steps(r.partials, p.denoise_steps)) for row, (r, i) in enumerate(items)
        ]
        watched = [w for w in watched if w[1].on_partial is not None and w[3]]

        def on_step(pipeline, step, timestep, kwargs):
            batch.step = skipped + step + 1
            latents = kwargs.get("latents")
            for row, r, i, marks in watched:
                if step + 1 in marks and latents is not None and not r.cancelled:
                    r.on_partial(i, marks.index(step + 1), latent_preview(latents[row], p.width, p.height))
            if all(r.cancelled or r.interrupted for r in distinct):
                batch.interrupted = not all(r.cancelled for r in distinct)
                pipeline._interrupt = True  # diffusers pipelines check this each step
            return kwargs

        kwargs: dict[str, Any] = {}
        if p.eta is not None and p.scheduler.sampler.name == "DDIM":
            kwargs["eta"] = p.eta
        if p.mode == "txt2img":
            kwargs.update(width=p.width, height=p.height)
        else:
            kwargs.update(image=[r.image for r in reqs], strength=p.strength)
        if p.mode == "inpaint":
            kwargs.update(mask_image=[r.mask for r in reqs], width=p.width, height=p.height)
        self.running = batch
        try:
            if self.before_pipeline_call is not None:
                self.before_pipeline_call(len(items))
            t = time.perf_counter()
            with torch.inference_mode():
                out = pipe(
                    prompt=[r.prompt for r in reqs],
                    negative_prompt=[r.negative_prompt for r in reqs] if p.has_negative else None,
                    num_inference_steps=p.steps,
                    guidance_scale=p.guidance,
                    generator=generators,
                    output_type="pil",
                    callback_on_step_end=on_step,
                    **kwargs,
                )
            seconds = time.perf_counter() - t
        finally:
            self.running, self.last_batch = None, batch
            with self._cond:  # together: an interrupt after this cannot mark the request's next batch
                self._running = []
                for r in distinct:  # an interrupt stops one batch; a request's later images still run
                    r.interrupted = False
        nsfw = getattr(out, "nsfw_content_detected", None) or [False] * len(items)
        return out.images, [bool(x) for x in nsfw], seconds
