"""Stock Ubuntu 22.04 and 24.04 nodes (debootstrapped from Ubuntu's archive), CPU mode, end to end.

site.yml with the inventory's defaults (no python_env_python): each release serves on its own python3,
22.04's 3.10 with the cuda-py310 lock and 24.04's 3.12 with cuda-py312. A CPU node installs the CUDA
lock a GPU node installs (no CPU torch for those Pythons can be reached here), and torch runs on its
CPU kernels. Converge, a second run with changed=0, `make verify` with the service's checks, `make
smoke`, and a manifest that names the OS, Python, lock and torch.

22.04 runs on stock Ansible (the `linear` strategy), the others over Mitogen as ansible.cfg sets it,
so the fallback that README's "Speed" section offers stays proven from a fresh node on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from .conftest import (
    STATE,
    PlaybookRun,
    ansible_playbook,
    assert_converged,
    assert_idempotent,
    explain,
    make_target,
    sdnode,
    verify,
)
from .conftest import TestNodes as Nodes  # aliased: pytest would try to collect a Test* name

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Release:
    node: str
    title: str  # as the manifest's os names it
    python: str
    lock: str
    strategy: str  # Ansible's, for this node's runs


RELEASES = {
    "ubuntu-22.04": Release("ub22", "Ubuntu 22.04", "3.10", "cuda-py310", "linear"),
    "ubuntu-24.04": Release("ub24", "Ubuntu 24.04", "3.12", "cuda-py312", "mitogen_linear"),
}


@dataclass
class Served:
    release: Release
    inventory: Path
    converge: PlaybookRun
    idempotence: PlaybookRun


@pytest.fixture(scope="module", params=sorted(RELEASES))
def served(request, testnodes: Nodes, tiny_model: Path) -> Served:
    release = RELEASES[request.param]
    testnodes.up(release.node, "--os", request.param)
    inventory = testnodes.inventory(STATE / "ci" / release.node, [release.node])
    converge = ansible_playbook(
        "site.yml", inventory, label=f"{release.node}-site", strategy=release.strategy
    )
    assert_converged(converge)
    idempotence = make_target(
        "deploy", inventory, label=f"{release.node}-site-again", strategy=release.strategy
    )
    return Served(release, inventory, converge, idempotence)


def test_node_runs_the_release_it_was_built_from(served: Served, testnodes: Nodes) -> None:
    found = testnodes.ssh(served.release.node, ". /etc/os-release && echo $PRETTY_NAME").stdout
    assert found.startswith(served.release.title), found


def test_site_converges_then_changes_nothing(served: Served) -> None:
    assert served.converge.changed >= 30, served.converge.explain()
    for role in ("base", "python_env", "model_cache", "sd_service"):
        assert f"TASK [{role} :" in served.converge.output, f"role {role} never ran"
    assert_idempotent(served.idempotence)
    # Ansible warns when it loads a strategy from outside ansible.builtin: Mitogen's, and only it.
    for run in (served.converge, served.idempotence):
        assert ("strategy plugins not included" in run.output) == (served.release.strategy != "linear")


def test_verify_passes_with_the_service_checks(served: Served) -> None:
    out = verify(served.inventory)
    assert "tests/node/test_service.py::" in out and "tests/node/test_release.py::" in out, out[-3000:]


def test_smoke_writes_an_image(served: Served) -> None:
    started = time.time()
    run = make_target("smoke", served.inventory, label=f"{served.release.node}-smoke")
    assert run.rc == 0, run.explain()
    images = [
        p for p in (STATE / "smoke").glob(f"{served.release.node}-*.png") if p.stat().st_mtime >= started
    ]
    assert images, f"no smoke image written under {STATE / 'smoke'} by this run"
    with Image.open(images[0]) as img:
        img.load()
        assert img.format == "PNG" and img.size == (64, 64)


def test_manifest_names_os_python_lock_and_torch(served: Served) -> None:
    manifest = json.loads((STATE / "manifests" / f"{served.release.node}.json").read_text())
    assert manifest["os"] == served.release.title, manifest["os"]
    service = manifest["service"]
    assert service["python"].startswith(served.release.python + "."), service["python"]
    assert manifest["lock"]["name"] == served.release.lock and len(manifest["lock"]["sha256"]) == 64
    assert service["torch"] and service["packages"]["torch"] == service["torch"].split("+")[0]
    assert service["cuda_available"] is False  # the CUDA build, running on the CPU


@pytest.mark.parametrize("served", ["ubuntu-22.04"], indirect=True)
def test_jammy_python311_is_refused_and_the_node_keeps_serving(served: Served, testnodes: Nodes) -> None:
    """What an operator might try: jammy's own python3.11 package, the 3.11.0rc1 pre-release on which
    torch fails to import. python_env refuses it, naming the variable, before changing anything."""
    node = served.release.node
    live = testnodes.ssh(node, "readlink /opt/sdserve/current").stdout.strip()
    testnodes.ssh(node, "DEBIAN_FRONTEND=noninteractive apt-get install -qy python3.11-venv")
    rc1 = ansible_playbook(
        "deploy.yml",
        served.inventory,
        extra_vars={"python_env_python": "/usr/bin/python3.11"},
        label=f"{node}-deploy-rc-python",
    )
    assert rc1.rc != 0, rc1.explain()
    refusal = f"python_env_python: /usr/bin/python3.11 on {node} is Python 3.11.0 (candidate, a pre-release)"
    assert refusal in rc1.output, rc1.explain()
    assert rc1.changed == 0, rc1.changed_tasks()
    assert testnodes.ssh(node, "readlink /opt/sdserve/current").stdout.strip() == live


@pytest.mark.parametrize("served", ["ubuntu-22.04"], indirect=True)
def test_a_rebuilt_node_runs_exactly_what_it_ran(served: Served, testnodes: Nodes, tmp_path: Path) -> None:
    """Last on the node: save its manifest, destroy it, boot a fresh node under the same name, deploy,
    and compare. Driver, Python, every package of the release, lock, model checksum and unit must
    match; only what differs by design (time stamps, host keys, addresses) is left out."""
    node = served.release.node
    saved = tmp_path / f"{node}.json"
    saved.write_text(testnodes.ssh(node, "cat /etc/sdserve/manifest.json").stdout)
    testnodes.down(node)
    testnodes.up(node, "--os", "ubuntu-22.04")
    inventory = testnodes.inventory(STATE / "ci" / node, [node])  # its address may be another now
    fresh = testnodes.ssh(node, "test -e /opt/sdserve || echo fresh").stdout.strip()
    assert fresh == "fresh", "the node was not rebuilt from scratch"
    assert_converged(ansible_playbook("site.yml", inventory, label=f"{node}-rebuild-site"))
    proc = sdnode("diff-manifests", "-i", str(inventory), "--against", str(saved), "--json")
    assert proc.returncode == 0, explain(proc)
    [report] = json.loads(proc.stdout)
    assert report["identical"] and report["hosts"] == [f"{node} (saved)", node], report
    compared = json.loads(saved.read_text())
    # The comparison covered what runs, not a handful of keys.
    assert len(compared["service"]["packages"]) >= 50 and report["compared"] >= 100, report["compared"]
    for key in ("driver", "lock", "unit_sha256", "release_id", "model", "service"):
        assert key in compared, key
