"""AUTOMATIC1111 API over real HTTP with the webuiapi client, Basic auth included."""

from __future__ import annotations

import base64

import httpx
import pytest
import webuiapi

from sdserve.keys import key_line

KEY = "a1111-key-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def a1111(tiny_model, tmp_path_factory):
    from conftest import SIZE, LiveServer, free_port

    from sdserve.app import create_app
    from sdserve.settings import Settings

    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(key_line(KEY, "webui") + "\n")
    settings = Settings(
        model=tiny_model,
        cache_dir=tmp_path_factory.mktemp("c"),
        warmup_sizes=SIZE,
        warmup_steps=1,
        api_keys_file=keys,
        model_revision="abc1234def5678",
        output_dir=tmp_path_factory.mktemp("out"),
    )
    server = LiveServer(create_app(settings), free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(a1111):
    return webuiapi.WebUIApi(
        host="127.0.0.1", port=a1111.port, username="anyone", password=KEY, sampler="Euler a", steps=3
    )


def auth() -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"u:{KEY}".encode()).decode()}


def test_txt2img_with_webuiapi(api):
    result = api.txt2img(
        prompt="a castle",
        negative_prompt="fog",
        seed=1234,
        width=64,
        height=64,
        batch_size=2,
        n_iter=2,
        cfg_scale=6,
    )
    assert len(result.images) == 4 and all(im.size == (64, 64) for im in result.images)
    assert result.info["all_seeds"] == [1234, 1235, 1236, 1237] and result.info["seed"] == 1234
    assert result.info["sampler_name"] == "Euler a" and result.info["steps"] == 3
    assert (
        "Negative prompt: fog" in result.info["infotexts"][0] and "Seed: 1237" in result.info["infotexts"][3]
    )
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    assert result.parameters["prompt"] == "a castle"


def test_seed_minus_one_is_random_and_reported(api):
    result = api.txt2img(prompt="x", seed=-1, width=64, height=64)
    assert 0 <= result.info["seed"] <= 2**32 - 1


def test_same_seed_same_image(api):
    a = api.txt2img(prompt="x", seed=5, width=64, height=64, sampler_name="DPM++ 2M", scheduler="Karras")
    b = api.txt2img(prompt="x", seed=5, width=64, height=64, sampler_name="DPM++ 2M Karras")
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert a.info["extra_generation_params"]["Schedule type"] == "Karras"


def test_unhonourable_field_is_422_naming_it(api):
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", width=64, height=64, enable_hr=True)
    status, text = e.value.args
    assert status == 422 and "enable_hr" in text
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", width=64, height=64, restore_faces=True)
    assert e.value.args[0] == 422 and "restore_faces" in e.value.args[1]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"width": 100}, "width"),
        ({"sampler_name": "Quantum"}, "sampler_name"),
        ({"scheduler": "wobbly"}, "scheduler"),
        ({"batch_size": 17}, "batch_size"),
        ({"tiling": True}, "tiling"),
        (
            {"override_settings": {"sd_model_checkpoint": "other.safetensors"}},
            "override_settings.sd_model_checkpoint",
        ),
        ({"brand_new_field": "on"}, "brand_new_field"),
        ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
        ({"save_images": "maybe"}, "save_images"),
    ],
)
def test_validation(a1111, extra, param):
    r = httpx.post(
        a1111.url + "/sdapi/v1/txt2img",
        json={"prompt": "x", "width": 64, "height": 64, "steps": 2, **extra},
        headers=auth(),
    )
    assert r.status_code == 422, r.text
    assert r.json()["param"] == param and r.json()["detail"]


def test_accepts_fields_at_defaults_and_harmless_extras(a1111):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "override_settings": {"sd_model_checkpoint": "tiny-sd"},
            "brand_new_flag": False, "hr_scale": 4, "subseed": 77, "send_images": False, "save_images": True}  # fmt: skip
    r = httpx.post(a1111.url + "/sdapi/v1/txt2img", json=body, headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["images"] == []
    assert list(a1111.app.state.service.settings.output_dir.glob("a1111-*.png"))


def test_auth_required(a1111):
    assert httpx.post(a1111.url + "/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"u:wrong-key-wrong-key").decode()}
    r = httpx.get(a1111.url + "/sdapi/v1/samplers", headers=bad)
    assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]


def test_discovery_routes(api, a1111):
    samplers = api.get_samplers()
    assert {"Euler a", "DPM++ 2M", "PNDM", "DDIM", "UniPC"} <= {s["name"] for s in samplers}
    schedulers = httpx.get(a1111.url + "/sdapi/v1/schedulers", headers=auth()).json()
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in schedulers}
    models = api.get_sd_models()
    assert models[0]["model_name"] == "tiny-sd" and models[0]["title"] == "tiny-sd [abc1234def]"
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "tiny-sd [abc1234def]"
    api.util_set_model("tiny-sd")  # the loaded model: a no-op, accepted
    r = httpx.post(a1111.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"}, headers=auth())
    assert r.status_code == 422 and r.json()["param"] == "sd_model_checkpoint"
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0
    assert api.get_scripts() == {"txt2img": [], "img2img": []}


def test_progress_during_a_generation(a1111):
    from concurrent.futures import ThreadPoolExecutor

    from conftest import Gate

    engine = a1111.engine
    gate = Gate()
    engine.before_pipeline_call = gate
    try:
        with ThreadPoolExecutor(1) as pool:
            f = pool.submit(httpx.post, a1111.url + "/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 3},
                            headers=auth(), timeout=60)  # fmt: skip
            gate.entered.wait(30)
            p = httpx.get(a1111.url + "/sdapi/v1/progress", headers=auth()).json()
            assert (
                p["state"]["sampling_steps"] == 3
                and p["state"]["job_count"] == 1
                and p["state"]["job"] == "txt2img"
            )
            gate.open()
            assert f.result().status_code == 200
    finally:
        engine.before_pipeline_call = None


# img2img and inpainting ------------------------------------------------------------------------------------
def noise(seed: int, size=(64, 64)):
    import numpy as np
    from PIL import Image

    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )


def square(size=(64, 64), box=(24, 24, 40, 40)):
    from PIL import Image

    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def outside(reach: int, size=(64, 64), box=(24, 24, 40, 40)):
    """Pixels farther than `reach` from the mask's square."""
    import numpy as np

    far = np.ones((size[1], size[0]), bool)
    far[box[1] - reach : box[3] + reach, box[0] - reach : box[2] + reach] = False
    return far


def test_img2img_with_webuiapi(api):
    import numpy as np

    source = noise(1)
    args = {"prompt": "a castle", "seed": 77, "width": 64, "height": 64, "cfg_scale": 6}
    a = api.img2img(images=[source], **args)
    b = api.img2img(images=[source], **args)
    other = api.img2img(images=[noise(2)], **args)
    assert a.images[0].size == (64, 64) and a.info["all_seeds"] == [77]
    assert a.images[0].tobytes() == b.images[0].tobytes() != other.images[0].tobytes()
    assert a.info["denoising_strength"] == 0.75 and "Denoising strength: 0.75" in a.info["infotexts"][0]
    # Close to its input: nearer to it than to the other input.
    px = [np.asarray(im, dtype=float) for im in (a.images[0], source, noise(2))]
    assert np.abs(px[0] - px[1]).mean() < np.abs(px[0] - px[2]).mean()
    for mode in (1, 2):  # crop and resize, resize and fill: another aspect ratio in, the size asked out
        assert api.img2img(images=[noise(5, (64, 32))], resize_mode=mode, **args).images[0].size == (64, 64)
    batch = api.img2img(images=[source], batch_size=2, n_iter=2, **args)
    assert len(batch.images) == 4 and batch.info["all_seeds"] == [77, 78, 79, 80]
    # Per-image seeds: equal within rounding whatever the batch size.
    assert np.abs(np.asarray(batch.images[0], dtype=float) - px[0]).mean() < 1


def test_inpainting_with_webuiapi_keeps_the_original_outside_the_mask(api):
    """webuiapi's defaults: only masked (inpaint_full_res), fill, mask_blur 4. Pixels beyond the
    blurred mask's reach are the original's, byte for byte; the masked square is new."""
    import numpy as np

    source = noise(3)
    result = api.img2img(images=[source], mask_image=square(), prompt="a door", seed=5, width=64, height=64,
                         denoising_strength=1.0)  # fmt: skip
    got, orig = np.asarray(result.images[0]), np.asarray(source)
    assert got.shape == orig.shape
    far = outside(3 * 4)
    assert (got[far] == orig[far]).all()
    assert (got[28:36, 28:36] != orig[28:36, 28:36]).any()


@pytest.mark.parametrize("invert", [0, 1])
def test_inpainting_whole_picture_no_blur_is_exact_at_the_mask_edge(api, invert):
    import numpy as np

    source = noise(4)
    result = api.img2img(images=[source], mask_image=square(), prompt="a door", seed=5, width=64, height=64,
                         inpaint_full_res=False, mask_blur=0, inpainting_fill=1, denoising_strength=1.0,
                         inpainting_mask_invert=invert)  # fmt: skip
    got, orig = np.asarray(result.images[0]), np.asarray(source)
    kept = outside(0) if not invert else ~outside(0)
    assert (got[kept] == orig[kept]).all()
    assert (got[~kept] != orig[~kept]).any()


def test_img2img_bodies_may_carry_images_above_the_json_limit(a1111):
    """A 720x720 noise PNG is about 2 MB in base64: above MAX_BODY_BYTES (1 MiB), within the image limit."""
    import io

    buf = io.BytesIO()
    noise(6, (720, 720)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert len(b64) > 1024 * 1024
    body = {"init_images": [b64], "prompt": "x", "width": 64, "height": 64, "steps": 2}
    r = httpx.post(a1111.url + "/sdapi/v1/img2img", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.post(a1111.url + "/sdapi/v1/txt2img", json=body, headers=auth()).status_code == 413


def _b64(image, fmt="PNG") -> str:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"init_images": ["not base64!"]}, "init_images.0"),
        ({"init_images": [base64.b64encode(b"hello, not an image").decode()]}, "init_images.0"),
        ({"init_images": ["data:image/png;base64,"]}, "init_images.0"),
        ({"init_images": "gif"}, "init_images.0"),
        ({"init_images": "truncated"}, "init_images.0"),
        ({"init_images": "huge"}, "init_images.0"),  # above the pixel budget, a few KB of PNG
        ({"init_images": []}, "init_images"),
        ({"init_images": "two"}, "init_images"),
        ({"mask": "small"}, "mask"),
        ({"mask": "not base64!"}, "mask"),
        ({"resize_mode": 3}, "resize_mode"),
        ({"inpainting_fill": 2}, "inpainting_fill"),
        ({"denoising_strength": 0}, "denoising_strength"),
        ({"denoising_strength": 0.1}, "denoising_strength"),  # 2 steps x 0.1: no step would run
        ({"latent_mask": "x"}, "latent_mask"),
        ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier"),
        ({"mask_blur": -1}, "mask_blur"),
        ({"width": 100}, "width"),
        ({"enable_hr": True}, "enable_hr"),
    ],
)
def test_img2img_validation(a1111, extra, param):
    from PIL import Image

    good = _b64(noise(1))
    made = {
        "gif": [_b64(noise(1), "GIF")],
        "truncated": [base64.b64encode(base64.b64decode(good)[:200]).decode()],
        "huge": [_b64(Image.new("RGB", (2100, 2100)))],
        "two": [good, good],
        "small": _b64(square((32, 32), (8, 8, 16, 16))),
    }
    body = {"init_images": [good], "prompt": "x", "width": 64, "height": 64, "steps": 2, **extra}
    for key, value in body.items():
        if isinstance(value, str) and value in made:
            body[key] = made[value]
    r = httpx.post(a1111.url + "/sdapi/v1/img2img", json=body, headers=auth(), timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["param"] == param and r.json()["detail"], r.json()


# png-info, interrupt, skip ---------------------------------------------------------------------------------
def test_png_info_reads_back_what_txt2img_wrote(api):
    made = api.txt2img(prompt="a castle\nat night", negative_prompt="fog", seed=42, width=64, height=64)
    info = api.png_info(made.images[0])
    assert info.info == made.info["infotexts"][0]
    p = info.parameters
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Steps"]) == (
        "a castle\nat night",
        "fog",
        "42",
        "3",
    )
    assert (p["Size-1"], p["Size-2"], p["Sampler"]) == ("64", "64", "Euler a")


def test_png_info_reads_jpeg_exif_and_plain_images(a1111):
    from sdserve.images import encode

    text = 'a cat\nSteps: 3, Sampler: Euler a, Seed: 7, Model: "quoted, with comma"'
    body = {"image": base64.b64encode(encode(noise(1), text, "jpeg", 90)).decode()}
    r = httpx.post(a1111.url + "/sdapi/v1/png-info", json=body, headers=auth()).json()
    assert r["info"] == text and r["parameters"]["Seed"] == "7"
    assert r["parameters"]["Model"] == "quoted, with comma"
    plain = httpx.post(
        a1111.url + "/sdapi/v1/png-info", json={"image": _b64(noise(1))}, headers=auth()
    ).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize(
    "image", ["not base64!", base64.b64encode(b"no image").decode(), "data:image/png;base64"]
)
def test_png_info_refusals_name_the_field(a1111, image):
    r = httpx.post(a1111.url + "/sdapi/v1/png-info", json={"image": image}, headers=auth())
    assert r.status_code == 422 and r.json()["param"] == "image", r.text


def test_a_parameters_line_longer_than_any_a1111_writes_is_read_as_prompt():
    """The pattern's scan is quadratic: past MAX_PARAMETERS_LINE the line is not scanned."""
    from sdserve.images import MAX_PARAMETERS_LINE, parse_infotext

    line = "Steps: 3, " * (MAX_PARAMETERS_LINE // 10 + 1)
    assert "Steps" not in parse_infotext("p\n" + line) and parse_infotext("p\n" + line[:200])["Steps"] == "3"
    assert parse_infotext("a" * 100_000)["Prompt"] == "a" * 100_000


@pytest.mark.parametrize("route", ["interrupt", "skip"])
def test_interrupt_stops_the_running_batch_at_its_next_step(api, a1111, route):
    """Held at the gate, the batch is interrupted; it then runs one step and answers with the image
    as that step left it. The control, the same request not interrupted, runs every step."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import Gate

    engine = a1111.engine
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 3, "seed": 9}

    def run(stop: bool):
        gate = Gate()
        engine.before_pipeline_call = gate
        try:
            with ThreadPoolExecutor(1) as pool:
                f = pool.submit(
                    httpx.post, a1111.url + "/sdapi/v1/txt2img", json=body, headers=auth(), timeout=60
                )
                assert gate.entered.wait(30)
                if stop:
                    assert getattr(api, route)() == {}
                gate.open()
                r = f.result()
        finally:
            engine.before_pipeline_call = None
        assert r.status_code == 200, r.text
        return r.json()["images"][0], engine.last_batch

    stopped, batch = run(True)
    assert batch.step == 1 and batch.interrupted
    full, batch = run(False)
    assert batch.step == 3 and not batch.interrupted
    assert stopped != full
    assert api.interrupt() == {}  # nothing running: a no-op
