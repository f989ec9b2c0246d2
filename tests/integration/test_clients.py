"""The real `openai` and `webuiapi` clients, unchanged, against a deployed node: image to image with and
without a mask, png-info, interrupt, an edit with a mask, jpeg and webp, streamed partial images.

For this module the node's instances listen on its own address (`sd_service_listen_address`) and admit
the test-node bridge (`sd_service_allowed_networks`, as the firewall does from inventory.local), with the
API key the deploy generated;
the module's end puts loopback back and checks the node converged to it.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import openai
import pytest
import webuiapi
import yaml
from PIL import Image

from .conftest import STATE, Deployment, ansible_playbook, assert_converged

pytestmark = pytest.mark.integration

SIZE = 64  # inventory.local's smoke size: the tiny model's


@dataclass(frozen=True)
class Exposed:
    host: str
    port: int
    key: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture(scope="module")
def exposed(deployed: Deployment) -> Iterator[Exposed]:
    node, inventory = deployed.node, deployed.inventory
    hosts = yaml.safe_load(inventory.joinpath("hosts.yml").read_text())["all"]["children"]["sdnodes"]["hosts"]
    address = hosts[node]["ansible_host"]
    opened = ansible_playbook(
        "deploy.yml",
        inventory,
        extra_vars={"sd_service_listen_address": address, "sd_service_allowed_networks": ["10.213.0.0/24"]},
        label="deploy-exposed",
    )
    assert_converged(opened)
    try:
        manifest = json.loads((STATE / "manifests" / f"{node}.json").read_text())
        url = manifest["instances"][0]["url"]
        assert url == f"http://{address}:7860", url  # the manifest follows the listen address
        key = sorted((STATE / "api-keys").glob(f"{node}.*.key"))[0].read_text().strip()
        yield Exposed(address, 7860, key)
    finally:
        assert_converged(ansible_playbook("deploy.yml", inventory, label="deploy-loopback-again"))


@pytest.fixture(scope="module")
def a1111(exposed: Exposed) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=exposed.host, port=exposed.port, username="ci", password=exposed.key)


@pytest.fixture(scope="module")
def client(exposed: Exposed) -> openai.OpenAI:
    return openai.OpenAI(base_url=exposed.url + "/v1", api_key=exposed.key, max_retries=0, timeout=120)


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


BOX = (16, 16, 48, 48)  # the area masked for editing
EDITED = np.zeros((SIZE, SIZE), bool)
EDITED[BOX[1] : BOX[3], BOX[0] : BOX[2]] = True


def test_the_node_refuses_a_client_without_the_key(exposed: Exposed) -> None:
    keyless = openai.OpenAI(base_url=exposed.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.images.generate(prompt="x", size=f"{SIZE}x{SIZE}")


def test_webuiapi_img2img_follows_its_input_and_seed(a1111: webuiapi.WebUIApi) -> None:
    """How near the input the result stays is the service suite's to check; here: the node redraws
    the image it is given, the same way for the same seed."""
    args = {
        "prompt": "a castle",
        "seed": 7,
        "width": SIZE,
        "height": SIZE,
        "steps": 4,
        "denoising_strength": 0.5,
    }
    first = a1111.img2img(images=[noise(1)], **args)
    again = a1111.img2img(images=[noise(1)], **args)
    other = a1111.img2img(images=[noise(2)], **args)
    assert first.images[0].size == (SIZE, SIZE) and first.info["all_seeds"] == [7]
    assert "Denoising strength: 0.5" in first.info["infotexts"][0]
    assert first.images[0].tobytes() == again.images[0].tobytes() != other.images[0].tobytes()


def test_webuiapi_inpainting_keeps_every_pixel_outside_the_mask(a1111: webuiapi.WebUIApi) -> None:
    source = noise(3)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, BOX)  # A1111: white is repainted
    result = a1111.img2img(images=[source], mask_image=mask, prompt="a door", seed=5, width=SIZE, height=SIZE,
                           steps=4, mask_blur=0, inpaint_full_res=False, denoising_strength=1.0)  # fmt: skip
    got, orig = np.asarray(result.images[0]), np.asarray(source)
    assert (got[~EDITED] == orig[~EDITED]).all()
    assert (got[EDITED] != orig[EDITED]).any()


def test_webuiapi_png_info_reads_back_what_txt2img_wrote(a1111: webuiapi.WebUIApi) -> None:
    made = a1111.txt2img(prompt="a lighthouse", seed=42, width=SIZE, height=SIZE, steps=3)
    info = a1111.png_info(made.images[0])
    assert info.info == made.info["infotexts"][0]
    assert (info.parameters["Prompt"], info.parameters["Seed"], info.parameters["Steps"]) == (
        "a lighthouse",
        "42",
        "3",
    )


def test_webuiapi_interrupt_stops_the_running_generation(a1111: webuiapi.WebUIApi, exposed: Exposed) -> None:
    """A long request in a thread; once the node reports it sampling, interrupt. Its answer comes back
    with the image as the stopped step left it: not the image the same request gives when left alone."""
    body = {"prompt": "a long one", "seed": 3, "width": 256, "height": 256, "steps": 150}
    answers: list[webuiapi.WebUIApiResult] = []
    worker = threading.Thread(target=lambda: answers.append(a1111.txt2img(**body)))
    worker.start()
    seen = {}
    for _ in range(600):  # polls, not a clock: at most one minute of 0.1 s waits
        seen = a1111.get_progress()["state"]
        if seen["sampling_step"] >= 1:
            break
        threading.Event().wait(0.1)
    assert 1 <= seen["sampling_step"] < seen["sampling_steps"] == 150, seen
    assert a1111.interrupt() == {}
    worker.join(timeout=300)
    assert answers, "the interrupted request never answered"
    full = a1111.txt2img(**body)
    assert answers[0].images[0].size == (256, 256)
    assert answers[0].images[0].tobytes() != full.images[0].tobytes()


def test_openai_edit_with_a_mask_keeps_every_pixel_outside_it(client: openai.OpenAI) -> None:
    source = noise(4)
    mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), BOX)  # OpenAI: transparent is edited
    result = client.images.edit(
        image=("in.png", encoded(source), "image/png"),
        mask=("mask.png", encoded(mask), "image/png"),
        prompt="a window",
        extra_body={"seed": 11, "steps": 4},
    )
    got, orig = np.asarray(decoded(result.data[0].b64_json).convert("RGB")), np.asarray(source)
    assert (got[~EDITED] == orig[~EDITED]).all()
    assert (got[EDITED] != orig[EDITED]).any()


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_openai_output_format(client: openai.OpenAI, fmt: str, pil: str) -> None:
    result = client.images.generate(prompt="a boat", size=f"{SIZE}x{SIZE}", output_format=fmt,
                                    output_compression=60, extra_body={"seed": 1, "steps": 3})  # fmt: skip
    assert result.output_format == fmt
    assert decoded(result.data[0].b64_json).format == pil


def test_openai_streams_partial_images(client: openai.OpenAI) -> None:
    body = {"prompt": "a boat", "size": f"{SIZE}x{SIZE}", "extra_body": {"seed": 21, "steps": 8}}
    events = list(client.images.generate(**body, stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert all(decoded(e.b64_json).size == (SIZE, SIZE) for e in events)
    assert events[-1].b64_json == client.images.generate(**body).data[0].b64_json
