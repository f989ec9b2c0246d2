"""Prometheus metrics. One registry per app, so several apps (tests) never collide. What is state
rather than a count (queue depth, readiness, keys, jobs) is read at scrape time from its owner."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _GpuMemory:
    """Read at scrape time, only where torch sees a GPU."""

    def collect(self):
        import torch

        if not torch.cuda.is_available():
            return
        used = GaugeMetricFamily(
            "sdserve_gpu_memory_bytes", "GPU memory held by this process", labels=["device", "kind"]
        )
        for i in range(torch.cuda.device_count()):
            used.add_metric([str(i), "allocated"], torch.cuda.memory_allocated(i))
            used.add_metric([str(i), "reserved"], torch.cuda.memory_reserved(i))
            used.add_metric([str(i), "peak_allocated"], torch.cuda.max_memory_allocated(i))
        yield used
        free = GaugeMetricFamily("sdserve_gpu_memory_free_bytes", "Free memory on the GPU", labels=["device"])
        total = GaugeMetricFamily(
            "sdserve_gpu_memory_total_bytes", "Total memory of the GPU", labels=["device"]
        )
        for i in range(torch.cuda.device_count()):
            f, t = torch.cuda.mem_get_info(i)
            free.add_metric([str(i)], f)
            total.add_metric([str(i)], t)
        yield free
        yield total


class _Keys:
    """The key store's state, read at scrape time: a refused key file must be seen, not only logged."""

    def __init__(self, keys) -> None:
        self.keys = keys

    def collect(self):
        yield GaugeMetricFamily("sdserve_api_keys", "API keys in force", value=len(self.keys))
        yield GaugeMetricFamily(
            "sdserve_api_keys_file_stale",
            "1 when the last reload refused the key file (the previous keys stay in force)",
            value=1 if self.keys.stale else 0,
        )
        reloads = CounterMetricFamily(
            "sdserve_api_key_reloads", "Key file reloads (SIGHUP), by result", labels=["result"]
        )
        for result, count in self.keys.reloads.items():
            reloads.add_metric([result], count)
        yield reloads


class _Jobs:
    def __init__(self, jobs) -> None:
        self.jobs = jobs

    def collect(self):
        family = GaugeMetricFamily("sdserve_jobs", "Async jobs held, by status", labels=["status"])
        for status, count in self.jobs.counts().items():
            family.add_metric([status], count)
        yield family


class Metrics:
    def __init__(self, max_batch: int) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "sdserve_requests", "HTTP requests", ["route", "method", "status", "key"], registry=r
        )
        self.request_seconds = Histogram(
            "sdserve_request_seconds", "HTTP request duration", ["route"], buckets=_SECONDS, registry=r
        )
        self.queue_depth = Gauge("sdserve_queue_depth", "Requests waiting for the worker", registry=r)
        self.queue_limit = Gauge(
            "sdserve_queue_limit", "Most requests that may wait (QUEUE_SIZE); beyond it 429", registry=r
        )
        self.batch_size = Histogram(
            "sdserve_batch_size",
            "Images per pipeline call",
            buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch}),
            registry=r,
        )
        self.queue_seconds = Histogram(
            "sdserve_queue_seconds",
            "Time from submission to the first image's batch start",
            buckets=_SECONDS,
            registry=r,
        )
        self.gather_seconds = Histogram(
            "sdserve_batch_gather_seconds",
            "Time the worker waited for batch-mates (BATCH_WAIT_MS, BATCH_REJOIN_MS) before a batch",
            ["window"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.generation_seconds = Histogram(
            "sdserve_generation_seconds", "Duration of one pipeline call", buckets=_SECONDS, registry=r
        )
        self.images = Counter("sdserve_images", "Images generated", ["key"], registry=r)
        self.steps_per_second = Gauge(
            "sdserve_steps_per_second", "Denoising steps per second of the last pipeline call", registry=r
        )
        self.image_steps_per_second = Gauge(
            "sdserve_image_steps_per_second",
            "Images x steps per second of the last pipeline call",
            registry=r,
        )
        self.oom = Counter(
            "sdserve_out_of_memory", "Out-of-memory errors caught (each is retried in halves)", registry=r
        )
        self.failures = Counter(
            "sdserve_generation_failures", "Requests failed by the engine", ["reason"], registry=r
        )
        self.rejected = Counter(
            "sdserve_rejected", "Requests refused before queueing", ["reason"], registry=r
        )
        self.ready = Gauge("sdserve_ready", "1 when the model is loaded and warmed up", registry=r)
        r.register(_GpuMemory())

    def watch_engine(self, engine) -> None:
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.queue_limit.set(engine.settings.queue_size)
        self.ready.set_function(lambda: 1 if engine.ready else 0)

    def watch_keys(self, keys) -> None:
        self.registry.register(_Keys(keys))

    def watch_jobs(self, jobs) -> None:
        self.registry.register(_Jobs(jobs))
