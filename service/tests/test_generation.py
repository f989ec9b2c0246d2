"""The one generation flow without HTTP or FastAPI: spec, engine, images with seed and infotext,
encoded output, and the errors it answers with."""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image as PILImage

from sdserve.engine import Engine
from sdserve.errors import Cancelled, Problem, TimedOut
from sdserve.generation import Generations, make_spec
from sdserve.service import Service


@pytest.fixture
def flow(make_settings, tmp_path):
    engines = []

    def start(**overrides) -> Generations:
        settings = make_settings(output_dir=tmp_path / "out", **overrides)
        engine = Engine(settings).start()
        engines.append(engine)
        assert engine.wait_ready(60), engine.error
        return Generations(settings, engine, lambda: "tiny-sd", lambda: 0, ThreadPoolExecutor(1))

    yield start
    for engine in engines:
        engine.drain(30)


def spec(flow: Generations, **fields):
    base = dict(prompt="a lighthouse", negative_prompt="", width=64, height=64, n=2, steps=2,
                guidance=None, sampler="Euler", seed=41)  # fmt: skip
    return make_spec(flow.settings, **{**base, **fields})


def test_a_spec_becomes_images_with_seeds_infotext_and_png(flow):
    f = flow()
    images = asyncio.run(f.run(spec(f), "alice", "req-1"))
    assert [i.seed for i in images] == [41, 42]
    assert "Seed: 41" in images[0].infotext and "Model: tiny-sd" in images[0].infotext
    assert images[0].nsfw is False
    png = asyncio.run(f.png(images[0]))
    with PILImage.open(io.BytesIO(png)) as decoded:
        assert decoded.size == (64, 64) and decoded.info["parameters"] == images[0].infotext
    assert base64.b64decode(asyncio.run(f.b64_png(images[0]))) == png
    name = asyncio.run(f.save(images[1], "img"))
    assert (f.settings.output_dir / name).read_bytes().startswith(b"\x89PNG")


def test_a_spec_names_the_field_in_the_apis_words(flow):
    f = flow()
    with pytest.raises(Problem) as e:
        spec(f, width=65, names={"width": "size"})
    assert e.value.param == "size" and e.value.status == 422
    with pytest.raises(Problem) as e:
        spec(f, prompt="x" * 5000)
    assert e.value.param == "prompt"


def test_a_client_gone_cancels_and_a_timeout_answers_504(flow):
    f = flow(request_timeout_s=0.5, max_steps=5000)
    long = spec(f, steps=5000, n=1)

    async def gone() -> None:
        return None  # the client left at once

    with pytest.raises(Cancelled):
        asyncio.run(f.run(long, "alice", "req-2", gone))
    with pytest.raises(TimedOut) as e:
        asyncio.run(f.run(long, "alice", "req-3"))
    assert e.value.status == 504 and "SDSERVE_REQUEST_TIMEOUT_S" in e.value.message


def test_requests_still_encode_what_the_drain_let_finish(make_settings, tmp_path):
    """SIGTERM: the drain ends when the engine's work is done, but the requests that work belongs
    to encode their images after it; they must get them, not a 500."""
    service = Service.build(make_settings(output_dir=tmp_path / "out"))
    service.engine.start()
    assert service.engine.wait_ready(60), service.engine.error

    async def finish_then_encode() -> bytes:
        images = await service.generations.run(spec(service.generations, n=1), "alice", "req-1")
        assert await service.drain()
        return await service.generations.png(images[0])

    try:
        assert asyncio.run(finish_then_encode()).startswith(b"\x89PNG")
    finally:
        service.close()
