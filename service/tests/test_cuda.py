"""What only a CUDA device can show: half precision with channels_last, seeds across batch sizes on
CUDA kernels, a real (not injected) out-of-memory error, and the compiled UNet.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine:
    pytest service/tests/test_cuda.py        (scripts/tools/gpu_checks.sh runs it)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdserve.engine import Engine, GenParams, OutOfMemory
from sdserve.schedulers import resolve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZE = 512  # large enough for the VAE's activations to dominate memory, as with a real model
P = GenParams(SIZE, SIZE, 4, 7.0, resolve("DPM++ 2M Karras"))


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


@pytest.fixture
def cuda_engine(make_settings):
    engines: list[Engine] = []

    def start(**overrides) -> Engine:
        settings = make_settings(device="cuda", warmup_sizes=f"{SIZE}x{SIZE}", **overrides)
        e = Engine(settings).start()
        engines.append(e)
        assert e.wait_ready(600), e.error
        return e

    yield start
    for e in engines:
        e.drain(60)
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_half_precision_channels_last_on_cuda(cuda_engine) -> None:
    e = cuda_engine()
    assert e.model.device == "cuda" and e.model.dtype == torch.float16
    assert next(e.model.pipe.unet.parameters()).is_cuda
    conv = next(m for m in e.model.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    img = e.submit(P, "a red cube", "", [1]).future.result(120)[0]
    assert img.size == (SIZE, SIZE) and pixels(img).std() > 0


def test_same_seed_alone_and_in_a_batch_agree_within_tolerance_on_cuda(cuda_engine) -> None:
    """CUDA kernels may pick other algorithms per batch size: equal within a small tolerance."""
    e = cuda_engine()
    batch = e.submit(P, "a red cube", "", [7, 8, 9, 10]).future.result(120)
    alone = e.submit(P, "a red cube", "", [7]).future.result(120)[0]
    diff = np.abs(pixels(batch[0]) - pixels(alone)).mean()
    print(f"mean |diff| alone vs batch of 4: {diff:.4f} (0-255)")
    assert diff < 2.0
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).mean() > 5  # other seeds, other images


def test_real_out_of_memory_is_retried_in_halves_and_serving_goes_on(cuda_engine) -> None:
    """The allocator is capped so that one image fits and eight do not: the batch of eight meets a
    genuine torch.OutOfMemoryError, is retried in halves, and every image still comes back equal to
    the one generated without the cap."""
    e = cuda_engine(max_batch=8)
    seeds = list(range(100, 108))
    reference = e.submit(P, "a blue sphere", "", seeds).future.result(300)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    e.submit(P, "a blue sphere", "", [seeds[0]]).future.result(120)
    one = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2.5 * one) / total)
    try:
        before = e.metrics.oom._value.get()
        capped = e.submit(P, "a blue sphere", "", seeds).future.result(300)
        assert e.metrics.oom._value.get() > before, "the cap did not cause an out-of-memory error"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    for got, want in zip(capped, reference, strict=True):
        assert np.abs(pixels(got) - pixels(want)).mean() < 2.0
    assert e.state == "ready"
    assert e.submit(P, "after", "", [1]).future.result(120)


def test_out_of_memory_for_a_single_image_is_a_clear_error(cuda_engine) -> None:
    e = cuda_engine()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (16 << 20)) / total)
    try:
        with pytest.raises(OutOfMemory, match="out of GPU memory"):
            e.submit(GenParams(2048, 2048, 2, 7.0, P.scheduler), "huge", "", [1]).future.result(300)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert e.submit(P, "after", "", [1]).future.result(120)


def test_compiled_unet_matches_eager(cuda_engine) -> None:
    eager = cuda_engine()
    want = eager.submit(P, "a green cone", "", [3]).future.result(120)[0]
    eager.drain(60)
    compiled = cuda_engine(compile=True, max_batch=2)
    assert type(compiled.model.pipe.unet).__name__ == "OptimizedModule"
    got = compiled.submit(P, "a green cone", "", [3]).future.result(600)[0]
    assert np.abs(pixels(got) - pixels(want)).mean() < 2.0
