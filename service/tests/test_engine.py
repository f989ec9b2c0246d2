"""The engine without HTTP: batching, per-image seeds, scheduler per call, OOM halving, queue bounds."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import Gate, wait_until

from sdserve.engine import Cancelled, Engine, GenParams, OutOfMemory, QueueFull
from sdserve.model import LoadedModel, load_pipeline
from sdserve.schedulers import SAMPLERS, resolve


@pytest.fixture(scope="module")
def loaded(tiny_model, tmp_path_factory) -> LoadedModel:
    from sdserve.settings import Settings

    return load_pipeline(Settings(model=tiny_model, cache_dir=tmp_path_factory.mktemp("c")))


@pytest.fixture
def engine(make_settings, loaded):
    engines = []

    def start(gate=None, **overrides) -> Engine:
        e = Engine(make_settings(**overrides), model=loaded)
        engines.append(e)
        e.start()
        assert e.wait_ready(60), e.error
        e.before_pipeline_call = gate  # after warm-up, so the gate sees only requests
        return e

    yield start
    for e in engines:
        if e.before_pipeline_call is not None and hasattr(e.before_pipeline_call, "open"):
            e.before_pipeline_call.open()
        e.drain(30)


P = GenParams(64, 64, 3, 7.0, resolve("Euler a"))


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_loads_through_auto_pipeline(loaded):
    # The tiny model takes the same path as a real one: AutoPipelineForText2Image from a local dir.
    assert loaded.pipeline_class == "StableDiffusionPipeline"
    assert loaded.native_size == (64, 64)
    assert loaded.device == "cpu" and loaded.dtype == torch.float32


def test_same_seed_same_batch_size_gives_same_bytes(engine):
    e = engine()
    a = e.submit(P, "a red cube", "", [11, 12]).future.result(60)
    b = e.submit(P, "a red cube", "", [11, 12]).future.result(60)
    assert [x.image.tobytes() for x in a] == [x.image.tobytes() for x in b]
    assert a[0].image.tobytes() != a[1].image.tobytes()  # seeds s, s+1 differ


def test_seed_independent_of_batch_mates(engine):
    """Seed 7 alone vs. seed 7 in a batch of four (with other prompts): equal within rounding."""
    gate = Gate()
    e = engine(gate=gate)
    blocker = e.submit(P, "blocker", "", [0])
    gate.entered.wait(30)
    mates = [e.submit(P, f"other {i}", "", [100 + i]) for i in range(2)]
    target = e.submit(P, "a red cube", "", [7])
    more = e.submit(P, "another", "", [200])
    gate.open()
    batched = target.future.result(60)[0].image
    for r in (blocker, *mates, more):
        r.future.result(60)
    assert gate.calls[1] == 4, f"expected the four queued requests in one batch, got calls {gate.calls}"
    alone = e.submit(P, "a red cube", "", [7]).future.result(60)[0].image
    diff = np.abs(pixels(batched) - pixels(alone)).mean()
    assert diff < 1.0, diff
    # ...and a different seed really gives a different image, so the check above means something.
    other = e.submit(P, "a red cube", "", [8]).future.result(60)[0].image
    assert np.abs(pixels(other) - pixels(alone)).mean() > 1.0


def test_batches_only_compatible_requests_and_respects_max_batch(engine):
    gate = Gate()
    e = engine(gate=gate, max_batch=3)
    first = e.submit(P, "x", "", [0])
    gate.entered.wait(30)
    other_size = GenParams(72, 64, 3, 7.0, resolve("Euler a"))
    reqs = [e.submit(P, "x", "", [1, 2]), e.submit(other_size, "y", "", [3]), e.submit(P, "z", "", [4, 5])]
    gate.open()
    for r in (first, *reqs):
        r.future.result(60)
    # 1 (blocker), then 2+1 of the compatible ones (max 3), then the 72x64 one, then the last image.
    assert gate.calls == [1, 3, 1, 1]
    assert [g.image.size for g in reqs[1].future.result()] == [(72, 64)]


def test_scheduler_state_never_shared(engine, loaded):
    """Each call builds its own scheduler; the model's config is left as loaded."""
    e = engine()
    base = dict(e._base_scheduler_config)
    seen = []
    e.before_pipeline_call = lambda n: seen.append(id(e.model.pipe.scheduler))
    for name in ("DPM++ 2M Karras", "PNDM", "Euler a"):
        e.submit(GenParams(64, 64, 3, 7.0, resolve(name)), "x", "", [1]).future.result(60)
    assert len(set(seen)) == 3
    assert dict(e._base_scheduler_config) == base


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_every_sampler_generates(engine, sampler):
    e = engine()
    steps = 2 if sampler != "LCM" else 1
    imgs = e.submit(GenParams(64, 64, steps, 5.0, resolve(sampler)), "x", "", [3]).future.result(60)
    assert imgs[0].image.size == (64, 64)


def test_pndm_fifty_steps_as_in_the_original_design(engine):
    e = engine()
    imgs = e.submit(GenParams(64, 64, 50, 7.5, resolve("PNDM")), "x", "", [3]).future.result(120)
    assert np.asarray(imgs[0].image).std() > 0


def test_out_of_memory_is_retried_in_halves(engine):
    calls = []

    def oom_above_one(n):
        calls.append(n)
        if n > 1:
            raise torch.OutOfMemoryError("injected")

    gate = Gate()
    e = engine(gate=gate)
    blocker = e.submit(P, "x", "", [0])
    gate.entered.wait(30)
    reqs = [e.submit(P, "x", "", [i]) for i in range(1, 5)]
    e.before_pipeline_call = oom_above_one
    gate.open()
    blocker.future.result(60)
    for r in reqs:
        assert len(r.future.result(60)) == 1
    assert calls == [4, 2, 1, 1, 2, 1, 1]
    assert e.metrics.oom._value.get() == 3


def test_single_image_out_of_memory_fails_alone_and_engine_keeps_serving(engine):
    e = engine()

    def oom(n):
        raise torch.OutOfMemoryError("injected")

    e.before_pipeline_call = oom
    with pytest.raises(OutOfMemory, match="out of GPU memory"):
        e.submit(P, "x", "", [1]).future.result(60)
    e.before_pipeline_call = None
    assert len(e.submit(P, "x", "", [1]).future.result(60)) == 1


def test_full_queue_refuses(engine):
    gate = Gate()
    e = engine(gate=gate, queue_size=2)
    running = e.submit(P, "x", "", [0])
    gate.entered.wait(30)
    queued = [e.submit(P, "x", "", [1]), e.submit(P, "x", "", [2])]
    with pytest.raises(QueueFull):
        e.submit(P, "x", "", [3])
    gate.open()
    for r in (running, *queued):
        r.future.result(60)


def test_cancel_removes_a_queued_request(engine):
    gate = Gate()
    e = engine(gate=gate)
    running = e.submit(P, "x", "", [0])
    gate.entered.wait(30)
    queued = e.submit(P, "x", "", [1])
    assert e.queue_depth == 1
    e.cancel(queued)
    assert e.queue_depth == 0
    with pytest.raises(Cancelled):
        queued.future.result(1)
    gate.open()
    running.future.result(60)
    assert gate.calls == [1]


def test_cancel_interrupts_a_running_batch(engine):
    """Cancelled before its first step: the batch stops there, not after its 40 steps."""
    e = engine()
    started = threading.Event()
    release = threading.Event()
    e.before_pipeline_call = lambda n: (started.set(), release.wait(30))
    req = e.submit(GenParams(64, 64, 40, 7.0, resolve("Euler")), "x", "", [1])
    started.wait(30)
    e.cancel(req)
    release.set()
    with pytest.raises(Cancelled):
        req.future.result(60)
    wait_until(lambda: not e.busy, what="worker idle")
    assert e.last_batch.step == 1, f"the batch ran {e.last_batch.step} of 40 steps after its cancel"
    e.before_pipeline_call = None
    assert e.submit(P, "x", "", [1]).future.result(60)


def test_drain_finishes_queued_work_then_refuses(engine):
    gate = Gate()
    e = engine(gate=gate)
    reqs = [e.submit(P, "x", "", [i]) for i in range(3)]
    gate.entered.wait(30)
    t = threading.Thread(target=e.drain, args=(60,))
    t.start()
    wait_until(lambda: e.state == "draining", what="draining")
    gate.open()
    t.join(60)
    assert all(len(r.future.result(0)) == 1 for r in reqs)
    assert e.state == "stopped"


def test_batch_wait_window_gathers_batch_mates(engine):
    """With a wait window an idle worker waits for company (until the batch is full)."""
    calls = []
    e = engine(batch_wait_ms=10_000, max_batch=2)
    e.before_pipeline_call = calls.append
    first = e.submit(P, "x", "", [1])
    wait_until(lambda: e.queue_depth == 1, what="first queued")
    assert calls == []  # waiting for a batch-mate, not started
    second = e.submit(P, "y", "", [2])
    first.future.result(60), second.future.result(60)
    assert calls == [2]


def test_negative_prompt_presence_splits_batches(engine):
    gate = Gate()
    e = engine(gate=gate)
    blocker = e.submit(P, "x", "", [0])
    gate.entered.wait(30)
    with_negative = GenParams(64, 64, 3, 7.0, resolve("Euler a"), has_negative=True)
    reqs = [e.submit(P, "a", "", [1]), e.submit(with_negative, "b", "blurry", [2]), e.submit(P, "c", "", [3])]
    gate.open()
    for r in (blocker, *reqs):
        r.future.result(60)
    assert gate.calls == [1, 2, 1]


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from sdserve.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("xl") / "tiny-sdxl", kind="sdxl")


def test_sdxl_through_the_same_path(make_settings, sdxl_model):
    """Another pipeline class (two text encoders, text-time conditioning) through the same loading
    code and engine: seeds stay independent of batch-mates, negative prompts work."""
    gate = Gate()
    e = Engine(make_settings(model=sdxl_model)).start()
    try:
        assert e.wait_ready(60), e.error
        assert e.model.pipeline_class == "StableDiffusionXLPipeline"
        e.before_pipeline_call = gate
        params = GenParams(64, 64, 3, 5.0, resolve("DPM++ 2M Karras"), has_negative=True)
        blocker = e.submit(P, "x", "", [0])
        gate.entered.wait(30)
        batched = [e.submit(params, "a city", "fog", [5]), e.submit(params, "a field", "rain", [6])]
        gate.open()
        blocker.future.result(60)
        in_batch = batched[0].future.result(60)[0].image
        batched[1].future.result(60)
        assert gate.calls == [1, 2]
        alone = e.submit(params, "a city", "fog", [5]).future.result(60)[0].image
        assert np.abs(pixels(in_batch) - pixels(alone)).mean() < 1.0
    finally:
        gate.open()
        e.drain(30)


def test_cancel_during_the_wait_window_keeps_the_worker_alive(engine):
    calls = []
    e = engine(batch_wait_ms=10_000, max_batch=2)
    e.before_pipeline_call = calls.append
    lonely = e.submit(P, "x", "", [1])
    wait_until(lambda: e.phase == "gathering", what="the worker waiting for batch-mates")
    e.cancel(lonely)  # the request the worker gathers batch-mates for
    wait_until(lambda: e.phase == "idle", what="the worker back to idle with an empty queue")
    a, b = e.submit(P, "a", "", [2]), e.submit(P, "b", "", [3])
    assert len(a.future.result(60)) == 1 and len(b.future.result(60)) == 1
    assert calls == [2] and e.state == "ready"


def test_rejoin_window_keeps_closed_loop_clients_in_full_batches(engine):
    """After a batch of three requests, the next request waits for two more to come back,
    so clients that resubmit as soon as they are answered keep forming batches of three."""
    gate = Gate()
    e = engine(gate=gate, batch_rejoin_ms=10_000)
    blocker = e.submit(P, "x", "", [0])
    gate.entered.wait(30)
    first = [e.submit(P, f"c{i}", "", [i]) for i in range(3)]
    gate.open()
    for r in (blocker, *first):
        r.future.result(60)
    back = e.submit(P, "c0", "", [10])
    wait_until(lambda: e.phase == "gathering", what="the worker waiting for the others to come back")
    assert gate.calls == [1, 3]
    rest = [e.submit(P, f"c{i}", "", [10 + i]) for i in (1, 2)]
    for r in (back, *rest):
        r.future.result(60)
    assert gate.calls == [1, 3, 3]
    waited = e.metrics.registry.get_sample_value("sdserve_batch_gather_seconds_count", {"window": "rejoin"})
    assert waited == 1  # the operator sees what batching costs in waiting


def test_rejoin_window_never_delays_a_lone_client_or_other_parameters(engine):
    """A huge window, yet: one client's sequential requests start at once (its last batch
    held one request), and so does a request unlike the last batch."""
    calls = []
    e = engine(batch_rejoin_ms=10_000)
    e.before_pipeline_call = calls.append
    for i in range(3):
        assert e.submit(P, "solo", "", [i]).future.result(5)
    assert calls == [1, 1, 1]
    gate = Gate()
    e.before_pipeline_call = gate
    blocker = e.submit(P, "x", "", [0])
    gate.entered.wait(30)
    pair = [e.submit(P, "a", "", [1]), e.submit(P, "b", "", [2])]
    gate.open()
    for r in (blocker, *pair):
        r.future.result(60)
    other = GenParams(64, 64, 4, 7.0, resolve("Euler a"))
    assert e.submit(other, "different steps", "", [3]).future.result(5)
    assert gate.calls == [1, 2, 1]


def test_vae_slicing_only_when_the_batch_would_not_fit() -> None:
    from sdserve.engine import vae_slicing_needed

    gib = 1 << 30
    # A large GPU decodes a batch of 8 at 512x512 in one go; a 24 GB card with 10 GiB free slices.
    assert not vae_slicing_needed("cuda", 8, 512, 512, 130 * gib)
    assert vae_slicing_needed("cuda", 8, 512, 512, 10 * gib)
    assert not vae_slicing_needed("cuda", 1, 1024, 1024, 1 * gib)  # one image: nothing to slice
    # CPU: slicing above 4 images bounds peak memory, as before.
    assert vae_slicing_needed("cpu", 5, 64, 64, 0) and not vae_slicing_needed("cpu", 4, 64, 64, 0)
