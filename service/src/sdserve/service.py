"""The service: what one instance holds (settings, engine, keys, metrics, the generation flow, the
jobs) and how it stops. Free of HTTP; the routes in api/ reach it through api/deps.py."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .engine import Engine
from .generation import Generations
from .jobs import JobStore
from .keys import KeyStore
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("sdserve.service")


@dataclass
class Service:
    settings: Settings
    engine: Engine
    keys: KeyStore
    metrics: Metrics
    png_pool: ThreadPoolExecutor
    generations: Generations = field(init=False)
    jobs: JobStore = field(init=False)
    _drain: asyncio.Future | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.generations = Generations(
            self.settings, self.engine, lambda: self.model_id, lambda: len(self.keys), self.png_pool
        )
        self.jobs = JobStore(self.settings, self.generations, lambda: len(self.keys))
        self.metrics.watch_keys(self.keys)
        self.metrics.watch_jobs(self.jobs)

    @classmethod
    def build(cls, settings: Settings) -> Service:
        metrics = Metrics(settings.max_batch)
        return cls(
            settings,
            Engine(settings, metrics),
            KeyStore(settings.api_keys_file),
            metrics,
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdserve-png"),
        )

    @property
    def model_id(self) -> str:
        if self.engine.model is not None:
            return self.engine.model.model_id
        return self.settings.model_id or (self.settings.model.resolve().name if self.settings.model else "")

    @property
    def native_size(self) -> tuple[int, int]:
        """The model's own size, for requests that give none (512x512 until a model is loaded)."""
        return self.engine.model.native_size if self.engine.model else (512, 512)

    @property
    def draining(self) -> bool:
        """The drain has begun (SIGTERM): new work is refused from now on."""
        return self._drain is not None

    def drain(self) -> asyncio.Future:
        """Stop serving (SIGTERM): refuse new work at once, let queued and running work finish for
        up to DRAIN_TIMEOUT_S, then answer what is left 503 and stop the worker at its next step.
        Idempotent: the server starts it as soon as the signal comes, the lifespan awaits it."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_once())
        return asyncio.shield(self._drain)

    async def _drain_once(self) -> bool:
        log.info("draining: finishing queued and running work (up to %gs)", self.settings.drain_timeout_s)
        self.engine.refuse_new()
        clean = await asyncio.to_thread(self.engine.drain, self.settings.drain_timeout_s)
        await self.jobs.drain(5)  # their requests are finished or failed: only rendering is left
        return clean

    def close(self) -> None:
        """After the server has waited for its connections: requests still encode after the drain."""
        self.png_pool.shutdown(wait=True)
