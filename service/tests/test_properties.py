"""Property-based tests (hypothesis): no request body yields a 500, errors keep their shape,
and the limits hold for every combination of sizes, counts and steps."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdserve.app import create_app
from sdserve.errors import Problem
from sdserve.generation import make_spec
from sdserve.settings import Settings

LIMITS = Settings(max_side=1024, max_pixels=4 * 512 * 512, max_images=4, max_steps=50)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
OPENAI_FIELDS = [
    "prompt",
    "n",
    "size",
    "response_format",
    "model",
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "negative_prompt",
    "user",
    "quality",
]
A1111_FIELDS = ["prompt", "seed", "steps", "cfg_scale", "width", "height", "batch_size", "n_iter", "sampler_name", "scheduler",
                "enable_hr", "override_settings", "eta", "tiling", "send_images", "styles"]  # fmt: skip


def bodies(fields: list[str]):
    known = st.dictionaries(st.sampled_from(fields), json_values, max_size=6)
    plausible = st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=30)},
        optional={
            "size": st.from_regex(r"\A\d{1,4}x\d{1,4}\Z"),
            "n": st.integers(-2, 20),
            "steps": st.integers(-2, 200),
            "width": st.integers(0, 3000),
            "height": st.integers(0, 3000),
            "scheduler": st.sampled_from(["Euler a", "DPM++ 2M Karras", "Karras", "nope", ""]),
            "sampler_name": st.sampled_from(["Euler a", "DPM++ 2M", "LMS Beta", "x"]),
        },
    )
    return known | plausible | st.dictionaries(st.text(max_size=10), json_values, max_size=4)


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    # The engine is not started, so valid bodies end at 503 "not ready": every path up to
    # the queue runs, and hypothesis can try hundreds of bodies quickly.
    app = create_app(
        Settings(model=tiny_model, cache_dir=tmp_path_factory.mktemp("c"), max_images=4), start_engine=False
    )
    with TestClient(app) as c:
        yield c


def check_error_shape(path: str, r) -> None:
    assert r.status_code != 500, r.text
    assert r.status_code in (400, 404, 413, 422, 503), r.text
    body = r.json()
    if path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    else:
        assert body["detail"] and "param" in body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies(OPENAI_FIELDS))
def test_openai_bodies_never_500(client, body):
    for path in ("/v1/images/generations", "/v1/jobs"):
        check_error_shape(path, client.post(path, json=body))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies(A1111_FIELDS))
def test_a1111_bodies_never_500(client, body):
    check_error_shape("/sdapi/v1/txt2img", client.post("/sdapi/v1/txt2img", json=body))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_500(client, raw):
    r = client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    check_error_shape("/v1/images/generations", r)


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "x", "guidance_scale": NaN}', b'{"prompt": "x", "steps": Infinity}', b'{"prompt": "x", "n": 1e400}',
     b'{"prompt": "x", "seed": 99999999999999999999999999}', b'{"prompt": "\\ud800"}', b"[]", b"null", b'"x"'],
)  # fmt: skip
def test_odd_json_never_500(client, raw):
    for path in ("/v1/images/generations", "/sdapi/v1/txt2img"):
        check_error_shape(path, client.post(path, content=raw, headers={"content-type": "application/json"}))


@given(
    width=st.integers(-10, 2000),
    height=st.integers(-10, 2000),
    n=st.integers(-1, 10),
    steps=st.none() | st.integers(-1, 100),
    guidance=st.none() | st.floats(0, 30),
    sampler=st.none() | st.sampled_from(["Euler a", "DPM++ 2M", "PNDM", "DDIM", "bogus"]),
    schedule=st.none() | st.sampled_from(["automatic", "Karras", "sgm_uniform", "bogus"]),
)
def test_a_spec_respects_every_limit(width, height, n, steps, guidance, sampler, schedule):
    try:
        p = make_spec(LIMITS, prompt="x", negative_prompt="", width=width, height=height, n=n, steps=steps,
                      guidance=guidance, sampler=sampler, schedule=schedule).params  # fmt: skip
    except Problem as e:
        assert e.param in {"width", "height", "n", "size", "steps", "scheduler"} and e.message
        return
    assert (
        p.width % 8 == 0
        and p.height % 8 == 0
        and min(p.width, p.height) >= 64
        and max(p.width, p.height) <= 1024
    )
    assert 1 <= n <= 4 and n * p.width * p.height <= LIMITS.max_pixels and 1 <= p.steps <= 50
