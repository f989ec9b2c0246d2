"""Release life cycle on the deployed node: a second release, rollback and forward again, a release
that never gets ready (the previous one keeps serving), kill -9 recovery, and bad variables that
fail before any change. Every test leaves the node on the release site.yml deployed."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import shutil
import tarfile
import threading
from pathlib import Path

import pytest

from .conftest import REPO, STATE, Deployment, ansible_playbook, assert_converged, make_target

pytestmark = pytest.mark.integration

ROOT = "/opt/sdserve"


def service_variant(name: str, patch: str) -> Path:
    """A copy of the service source with `patch` appended to sdserve/cli.py: a different wheel, so
    a different release id, built by the roles exactly as the real one is."""
    dest = STATE / "ci" / "variants" / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in ("pyproject.toml", "README.md", "requirements"):
        if (REPO / "service" / item).is_dir():
            shutil.copytree(REPO / "service" / item, dest / item)
        elif (REPO / "service" / item).exists():
            shutil.copy(REPO / "service" / item, dest / item)
    shutil.copytree(
        REPO / "service" / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    cli = dest / "src" / "sdserve" / "cli.py"
    cli.write_text(cli.read_text() + "\n" + patch + "\n")
    return dest


# Serves normally: only the bytes (and so the release id) differ.
GOOD = "# test variant: same behaviour, another release"
# Imports fine (the build's import check passes) but `sdserve serve` exits at once: never ready.
BROKEN = """
_real_main = main


def main(argv=None):
    import sys

    if (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        raise SystemExit("sdserve: broken on purpose by the integration suite")
    return _real_main(argv)
"""


def node_sh(testnodes, node: str, command: str) -> str:
    return testnodes.ssh(node, command).stdout.strip()


def links(testnodes, node: str) -> tuple[str, str]:
    out = node_sh(testnodes, node, f"readlink {ROOT}/current; readlink {ROOT}/previous || true").splitlines()
    return out[0], (out[1] if len(out) > 1 else "")


def ready(testnodes, node: str) -> bool:
    probe = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:7860/readyz', timeout=10).status)"
    return testnodes.ssh(node, f'python3 -c "{probe}"', check=False).stdout.strip() == "200"


def assert_model_untouched(testnodes, node: str, live_model: str) -> None:
    """After a failed model fetch: the live model as before, no staging left, still serving."""
    assert node_sh(testnodes, node, "readlink /var/lib/sdserve/models/current") == live_model
    leftovers = node_sh(testnodes, node, "ls -A /var/lib/sdserve/models | grep -F .staging || true")
    assert leftovers == "", f"the failed fetch left {leftovers!r} behind"
    assert ready(testnodes, node)


def manifest_release(testnodes, node: str) -> str:
    return json.loads(node_sh(testnodes, node, "cat /etc/sdserve/manifest.json"))["release_id"]


@pytest.fixture(scope="module")
def original(deployed: Deployment, testnodes) -> str:
    """The release site.yml put live; every test here returns the node to it."""
    current, _ = links(testnodes, deployed.node)
    assert current.startswith("releases/")
    yield current
    # Put the node back the way the rest of the suite expects it.
    run = ansible_playbook("deploy.yml", deployed.inventory, label="deploy-restore")
    assert_converged(run)
    assert links(testnodes, deployed.node)[0] == current


def test_settings_that_never_get_ready_are_put_back(deployed: Deployment, testnodes, original: str) -> None:
    """The same release with settings that pass every check but never serve (a CPU node told to use
    CUDA): the settings that served come back, and the node serves again on them."""
    node, inv = deployed.node, deployed.inventory
    # First in the module, so the deploy below builds the live release and changes settings only.
    assert links(testnodes, node)[0] == original, "a test before this one left another release live"
    env_before = node_sh(testnodes, node, "cat /etc/sdserve/sdserve.env")
    links_before = links(testnodes, node)
    bad = {"sd_service_device": "cuda", "sd_service_ready_timeout": 120}
    run = ansible_playbook("deploy.yml", inv, extra_vars=bad, label="deploy-cuda-on-cpu")
    assert run.rc != 0 and "put back the settings that served" in run.output, run.explain()
    assert "put back release" not in run.output, run.explain()  # the release did not change
    assert node_sh(testnodes, node, "cat /etc/sdserve/sdserve.env") == env_before
    assert links(testnodes, node) == links_before
    assert ready(testnodes, node)


def test_second_release_rollback_and_forward(deployed: Deployment, testnodes, original: str) -> None:
    node, inv = deployed.node, deployed.inventory
    wheelhouses = "ls /var/cache/sdnode/wheelhouse"
    live_wheelhouse = node_sh(testnodes, node, wheelhouses).split()
    assert len(live_wheelhouse) == 1, live_wheelhouse
    # What an older lock would have left: a building release removes it.
    node_sh(testnodes, node, "mkdir -p /var/cache/sdnode/wheelhouse/cpu-py311-0123456789ab")
    src = service_variant("good", GOOD)
    run = ansible_playbook(
        "deploy.yml", inv, extra_vars={"python_env_service_src": str(src)}, label="deploy-variant"
    )
    assert_converged(run)
    assert node_sh(testnodes, node, wheelhouses).split() == live_wheelhouse
    new, previous = links(testnodes, node)
    assert new != original and previous == original, (new, previous)
    assert ready(testnodes, node) and manifest_release(testnodes, node) == new.split("/")[1]

    # What a newer release leaves behind: a setting the older one does not know, which would stop it
    # at start-up (sdserve refuses unknown SDSERVE_* variables). Rolling back leaves it out.
    node_sh(testnodes, node, "echo SDSERVE_FROM_A_NEWER_RELEASE=1 >> /etc/sdserve/sdserve.env")
    back = make_target("rollback", inv, label="rollback")  # as the README shows it
    assert_converged(back)
    assert links(testnodes, node) == (original, new)
    assert ready(testnodes, node) and manifest_release(testnodes, node) == original.split("/")[1]
    assert "FROM_A_NEWER_RELEASE" not in node_sh(testnodes, node, "cat /etc/sdserve/sdserve.env")

    forward = ansible_playbook("rollback.yml", inv, label="rollback-again")
    assert_converged(forward)
    assert links(testnodes, node) == (new, original)
    assert ready(testnodes, node)


def test_release_that_never_gets_ready_leaves_the_previous_serving(
    deployed: Deployment, testnodes, original: str
) -> None:
    node, inv = deployed.node, deployed.inventory
    before = links(testnodes, node)
    src = service_variant("broken", BROKEN)
    run = ansible_playbook(
        "deploy.yml",
        inv,
        extra_vars={"python_env_service_src": str(src), "sd_service_ready_timeout": 120},
        label="deploy-broken",
    )
    assert run.rc != 0 and run.failed >= 1, run.explain()
    assert "put back release" in run.output and "broken on purpose" in run.output, run.explain()
    # The broken release was built (complete) but is not live; the links are as before.
    assert links(testnodes, node) == before
    assert ready(testnodes, node)
    assert manifest_release(testnodes, node) == before[0].split("/")[1]


def test_kill_9_is_recovered_by_systemd(deployed: Deployment, testnodes, original: str) -> None:
    node = deployed.node
    pid = node_sh(testnodes, node, "systemctl show sdserve@0.service --property=MainPID --value")
    assert pid.isdigit() and int(pid) > 0
    testnodes.ssh(node, f"kill -9 {pid}")
    # Bounded wait (no timing asserted): systemd restarts it after RestartSec and it loads again.
    waited = testnodes.ssh(
        node,
        "for i in $(seq 120); do "
        "p=$(systemctl show sdserve@0.service --property=MainPID --value); "
        f'[ "$p" != "{pid}" ] && [ "$p" != 0 ] && '
        "python3 /opt/sdserve/wait_ready.py http://127.0.0.1:7860/readyz sdserve@0.service 300 && exit 0; "
        "sleep 1; done; exit 1",
        check=False,
    )
    assert waited.returncode == 0, waited.stdout + waited.stderr
    restarts = node_sh(testnodes, node, "systemctl show sdserve@0.service --property=NRestarts --value")
    assert int(restarts) >= 1
    assert ready(testnodes, node)


# Runs on the node: one url image through the API, then its URL fetched; prints JSON.
URL_IMAGE_PROBE = """
import json, sys, urllib.error, urllib.request as u
key = sys.argv[1]
def call(req):
    try:
        with u.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
body = json.dumps({"prompt": "a lighthouse", "size": "64x64", "steps": 2, "response_format": "url"})
head = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
status, out = call(u.Request("http://127.0.0.1:7860/v1/images/generations", body.encode(), head))
got = {"status": status, "body": json.loads(out)}
if status == 200:
    url = got["body"]["data"][0]["url"]
    fetched, png = call(u.Request(url, headers=head))
    got.update(url=url, fetched=fetched, png=png[:8] == bytes([137, 80, 78, 71, 13, 10, 26, 10]))
print(json.dumps(got))
"""


def url_image(testnodes, node: str) -> dict:
    key = sorted((STATE / "api-keys").glob(f"{node}.*.key"))[0].read_text().strip()
    probe = testnodes.ssh(node, f"python3 -c '{URL_IMAGE_PROBE}' {key}", check=False)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    return json.loads(probe.stdout.strip().splitlines()[-1])


def test_url_images_are_kept_for_the_retention_then_not_at_all(
    deployed: Deployment, testnodes, original: str
) -> None:
    """sd_service_image_retention_minutes > 0: response_format url works, its image lies in the
    instance's state directory, readable by the service user only; back to 0, url is refused with
    a 422 naming the field and the variable, and no image stays on the node."""
    node, inv = deployed.node, deployed.inventory
    images = "/var/lib/sdserve-state/0/images"
    kept = ansible_playbook(
        "deploy.yml", inv, extra_vars={"sd_service_image_retention_minutes": 60}, label="deploy-url-images"
    )
    assert_converged(kept)
    assert "SDSERVE_OUTPUT_RETENTION_S=3600" in node_sh(testnodes, node, "cat /etc/sdserve/sdserve.env")
    got = url_image(testnodes, node)
    assert got["status"] == 200 and got["fetched"] == 200 and got["png"], got
    name = got["url"].rsplit("/", 1)[1]
    assert node_sh(testnodes, node, f"stat -c '%U %a' {images}/{name}") == "sdserve 600"

    off = ansible_playbook("deploy.yml", inv, label="deploy-url-images-off")
    assert_converged(off)
    refused = url_image(testnodes, node)
    assert refused["status"] == 422 and refused["body"]["error"]["param"] == "response_format", refused
    # The role passes its variable's name down: the refusal says what to set in the inventory.
    assert "set by sd_service_image_retention_minutes" in refused["body"]["error"]["message"], refused
    assert node_sh(testnodes, node, f"test -e {images} && echo present || echo gone") == "gone"


@pytest.fixture
def model_archive_url(tmp_path: Path, tiny_model: Path):
    """The tiny model as a tar.gz on a throwaway HTTP server on the test-node bridge (10.213.0.1)."""
    archive = tmp_path / "tiny-url.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tiny_model, arcname="tiny")  # wrapped in a directory, as published archives are
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("10.213.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            f"http://10.213.0.1:{server.server_port}/{archive.name}",
            hashlib.sha256(archive.read_bytes()).hexdigest(),
        )
    finally:
        server.shutdown()


def test_model_from_a_url_is_checked_against_its_sha256(
    deployed: Deployment, testnodes, original: str, model_archive_url
) -> None:
    node, inv = deployed.node, deployed.inventory
    url, sha = model_archive_url
    before = node_sh(testnodes, node, "readlink /var/lib/sdserve/models/current")
    common = {"model_cache_source": "url", "model_cache_url": url, "model_cache_url_strip_components": 1}

    wrong = ansible_playbook(
        "deploy.yml", inv, extra_vars={**common, "model_cache_url_sha256": "0" * 64}, label="url-bad-sha"
    )
    assert wrong.rc != 0 and "checksum" in wrong.output.lower(), wrong.explain()
    assert_model_untouched(testnodes, node, before)

    run = ansible_playbook(
        "deploy.yml", inv, extra_vars={**common, "model_cache_url_sha256": sha}, label="url-model"
    )
    assert_converged(run)
    now = node_sh(testnodes, node, "readlink /var/lib/sdserve/models/current")
    assert now.endswith(f"/tiny-url-{sha[:12]}"), now
    assert ready(testnodes, node)
    manifest = json.loads(node_sh(testnodes, node, "cat /etc/sdserve/manifest.json"))
    assert manifest["model"]["revision"] == f"sha256:{sha}" and manifest["model"]["path"] == now


HUB_REPO = "sdnode/tiny-sd"
HUB_COMMIT = "5b2c1e0a9d8f7e6d5c4b3a29180f7e6d5c4b3a21"
HUB_TOKEN = "hf_standinTokenNeverLogged7f3a"


@pytest.fixture
def hub_standin(tmp_path):
    """The tiny model served as a gated Hub repository at one commit (the real Hub cannot be
    reached here; see hubstandin.py), on the host's bridge address the node reaches. Laid out as
    SD 1.x repositories are: the UNet also as fp16 and non-EMA weights, and a safety checker that
    model_index.json lists."""
    from .hubstandin import HubStandIn

    repo = tmp_path / "repo"
    shutil.copytree(STATE / "models" / "tiny", repo)
    unet = repo / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(unet, unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    shutil.copy(unet, unet.with_name("diffusion_pytorch_model.non_ema.safetensors"))
    (repo / "safety_checker").mkdir()
    (repo / "safety_checker" / "config.json").write_text("{}")
    (repo / "safety_checker" / "model.safetensors").write_bytes(b"never fetched" * 1000)
    index = json.loads((repo / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (repo / "model_index.json").write_text(json.dumps(index, indent=2))
    with HubStandIn(repo, HUB_REPO, HUB_COMMIT, token=HUB_TOKEN) as hub:
        yield hub


def test_model_from_the_hub_through_a_configured_endpoint(
    deployed: Deployment, testnodes, original: str, hub_standin
) -> None:
    """The hub source end to end with the real huggingface_hub client on the node: a wrong token
    fails with the Hub's 401 and changes nothing; the right one fetches the pinned commit's
    files, one set of weights per component (here the fp16 variant, as on a GPU node) and no
    safety checker, and the service serves from them. Neither token ever appears in the output."""
    node, inv = deployed.node, deployed.inventory
    before = node_sh(testnodes, node, "readlink /var/lib/sdserve/models/current")
    common = {
        "model_cache_source": "hub",
        "model_cache_hub_id": HUB_REPO,
        "model_cache_revision": HUB_COMMIT,
        "model_cache_hub_endpoint": f"http://10.213.0.1:{hub_standin.port}/",
        "model_cache_poll_interval": 1,
        "model_cache_variant": "fp16",
    }
    wrong_token = "hf_wrongTokenAlsoNeverLogged"
    wrong = ansible_playbook(
        "deploy.yml", inv, extra_vars={**common, "model_cache_hf_token": wrong_token}, label="hub-bad-token"
    )
    assert wrong.rc != 0 and "401" in wrong.output, wrong.explain()
    assert wrong_token not in wrong.output
    assert_model_untouched(testnodes, node, before)

    run = ansible_playbook(
        "deploy.yml", inv, extra_vars={**common, "model_cache_hf_token": HUB_TOKEN}, label="hub-model"
    )
    assert_converged(run)
    assert HUB_TOKEN not in run.output
    # Sized before the download: the space check and the report know the total.
    assert re.search(r"[0-9.]+ of [0-9.]+ MiB \(\d+ files\) on disk \(done\)", run.output), run.explain()
    now = node_sh(testnodes, node, "readlink /var/lib/sdserve/models/current")
    assert now.endswith(f"/sdnode--tiny-sd-{HUB_COMMIT[:12]}"), now
    fetched = {
        r.split(f"/resolve/{HUB_COMMIT}/", 1)[1] for r in hub_standin.requests if r.startswith("GET /sdnode/")
    }
    assert {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    } <= fetched
    assert not {f for f in fetched if "non_ema" in f or f.startswith("safety_checker/")}, fetched
    on_node = node_sh(testnodes, node, f"cd {now} && find . -name '*.safetensors' | sort").split()
    assert on_node == [
        "./text_encoder/model.safetensors",
        "./unet/diffusion_pytorch_model.fp16.safetensors",
        "./vae/diffusion_pytorch_model.safetensors",
    ]
    assert ready(testnodes, node)
    manifest = json.loads(node_sh(testnodes, node, "cat /etc/sdserve/manifest.json"))
    assert manifest["model"]["path"] == now and manifest["model"]["id"] == HUB_REPO
    assert manifest["model"]["revision"] == HUB_COMMIT
    assert HUB_TOKEN not in node_sh(testnodes, node, "journalctl --no-pager -q -o cat | tail -n 3000")


BAD_VARIABLES = [
    (
        {"model_cache_source": "hub", "model_cache_hub_id": "org/model", "model_cache_revision": ""},
        "model_cache_revision",
    ),
    ({"sd_service_port_base": 70000}, "sd_service_port_base"),
    ({"sd_service_api_keys": []}, "sd_service_api_keys"),
    ({"sd_service_settings": {"MAX_BACTH": 4}}, "MAX_BACTH"),
    ({"sd_service_settings": {"PORT": 9000}}, "sd_service_port_base"),
    ({"python_env_flavour": "rocm"}, "python_env_flavour"),
    ({"nvidia_driver_branch": "latest"}, "nvidia_driver_branch"),
    ({"base_sshd_permit_root_login": "yes"}, "base_sshd_permit_root_login"),
]


@pytest.mark.parametrize(("extra", "named"), BAD_VARIABLES, ids=[n for _, n in BAD_VARIABLES])
def test_bad_variable_fails_naming_it_before_any_change(
    deployed: Deployment, testnodes, original: str, extra: dict, named: str
) -> None:
    before = links(testnodes, deployed.node)
    run = ansible_playbook("deploy.yml", deployed.inventory, extra_vars=extra, label=f"bad-{named}")
    assert run.rc != 0, run.explain()
    assert named in run.output, f"the failure does not name {named}\n{run.explain()}"
    assert run.changed == 0, f"changed before failing: {run.changed_tasks()}"
    assert links(testnodes, deployed.node) == before
    assert ready(testnodes, deployed.node)
