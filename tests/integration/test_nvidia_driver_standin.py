"""nvidia_driver on a GPU-less node, against stand-in packages under NVIDIA's real names.

Repository setup (current cuda-keyring, diverted vendor sources list, Signed-By), branch pin, holds,
unattended-upgrades blacklist, nouveau blacklist, fabric manager version match, the explicit upgrade
path and idempotence all run for real; `nvidia_driver_hardware_checks: false` skips only lspci, Secure
Boot, kernel headers, the loaded-module check, reboot and nvidia-smi (proved by tests/node on GPU nodes).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sdnode.state import cache_dir

from .conftest import STATE, ansible_playbook, assert_converged, assert_idempotent
from .conftest import TestNodes as Nodes  # aliased: pytest would try to collect a Test* name
from .standin.build_repo import publish

pytestmark = pytest.mark.integration

NODE = "drv2"
BRIDGE = "10.213.0.1"  # the host's address on the test-node bridge; the repository is served there only
PLAYBOOK = str(Path(__file__).parent / "standin" / "driver.yml")
V1, V2, OTHER_BRANCH = "570.100.01", "570.200.02", "580.50.01"
# Everything the Debian package set installs; all of it must end up held at one version.
DRIVER_PACKAGES = [
    "nvidia-driver-cuda",
    "nvidia-kernel-dkms",
    "nvidia-kernel-support",
    "nvidia-persistenced",
    "nvidia-smi",
    "libnvidia-ml1",
    "libcuda1",
    "nvidia-fabricmanager-570",
]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output readable
        pass


@dataclass
class StandinNode:
    testnodes: Nodes
    inventory: Path
    repo: Path
    pool: Path

    def sh(self, command: str) -> str:
        return self.testnodes.ssh(NODE, command).stdout

    def publish(self, *drivers: str) -> None:
        publish(self.pool, self.repo, "debian12", list(drivers))

    def versions(self) -> dict[str, str]:
        out = self.sh("dpkg-query -W -f='${Package} ${Version}\\n' " + " ".join(DRIVER_PACKAGES))
        return dict(line.split() for line in out.splitlines() if line.strip())

    def held(self) -> set[str]:
        return set(self.sh("apt-mark showhold").split())


@pytest.fixture(scope="module")
def standin(testnodes: Nodes) -> Iterator[StandinNode]:
    state = STATE / "standin"
    repo = state / "repo"
    # The built .debs outlive a clone (CI starts from one): rebuilt only when packages.yml changes.
    node = StandinNode(testnodes, Path(), repo, cache_dir() / "standin-pool")
    node.publish(V1, OTHER_BRANCH)
    testnodes.up(NODE)  # first: it brings up the bridge the repository server listens on
    server = ThreadingHTTPServer((BRIDGE, 0), partial(_QuietHandler, directory=str(repo)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        node.inventory = testnodes.inventory(
            STATE / "ci" / "standin",
            [NODE],
            host_vars={
                NODE: {
                    "sdnode_accelerator": "nvidia",
                    # The stand-in repository's branches; 580 stays in it as the newer one the pin keeps out.
                    "nvidia_driver_branch": "570",
                    # No torch runs on these packages, so the CUDA wheels' floor (580) does not apply.
                    "sdnode_min_driver_branch": 570,
                    "nvidia_driver_hardware_checks": False,
                    "nvidia_driver_repo_url": f"http://{BRIDGE}:{server.server_address[1]}",
                    "nvidia_driver_fabric_manager": "enabled",
                    "base_firewall_allowed_networks": ["10.213.0.0/24"],
                }
            },
        )
        yield node
    finally:
        server.shutdown()


def run(node: StandinNode, label: str, **kwargs):
    return ansible_playbook(PLAYBOOK, node.inventory, label=label, **kwargs)


@pytest.fixture(scope="module")
def converged(standin: StandinNode) -> StandinNode:
    first = run(standin, "standin-converge")
    assert_converged(first)
    assert first.changed >= 10, first.explain()
    assert "TASK [nvidia_driver :" in first.output, first.explain()
    assert_idempotent(run(standin, "standin-idempotence"))
    return standin


def test_installs_the_pinned_branch_and_holds_every_driver_package(converged: StandinNode) -> None:
    versions = converged.versions()
    assert versions == {p: f"{V1}-1" for p in DRIVER_PACKAGES}, versions
    assert set(DRIVER_PACKAGES) <= converged.held(), converged.held()


def test_pin_keeps_the_newer_branch_out(converged: StandinNode) -> None:
    # 580 is in the repository and newer; the pin (priority 1001 on 570.*) must still win.
    policy = converged.sh("apt-cache policy nvidia-driver-cuda")
    assert re.search(r"Candidate: 570\.100\.01-1", policy), policy
    assert "580.50.01-1" in policy, "the repository should offer the other branch: " + policy
    pin = converged.sh("cat /etc/apt/preferences.d/sdnode-nvidia-driver")
    assert re.search(r"^Pin: version 570\.\*$", pin, re.M) and "Pin-Priority: 1001" in pin, pin


def test_repository_uses_the_newest_keyring_and_only_our_source(converged: StandinNode) -> None:
    assert converged.sh("dpkg-query -W -f='${Version}' cuda-keyring") == "1.1-1"
    assert "cuda-debian12-x86_64.list" in converged.sh("dpkg-divert --list")
    sources = converged.sh(
        "grep -rh '^[^#]' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null || true"
    )
    assert "developer.download.nvidia.com" not in sources, sources
    ours = converged.sh("cat /etc/apt/sources.list.d/sdnode-nvidia-cuda.sources")
    assert "Signed-By: /usr/share/keyrings/cuda-archive-keyring.gpg" in ours, ours


def test_unattended_upgrades_never_touches_driver_packages(converged: StandinNode) -> None:
    dump = converged.sh("apt-config dump Unattended-Upgrade::Package-Blacklist")
    patterns = re.findall(r'^Unattended-Upgrade::Package-Blacklist:: "(.+)";$', dump, re.M)
    # unattended-upgrades applies each entry with re.match against the package name.
    unprotected = [p for p in DRIVER_PACKAGES if not any(re.match(x, p) for x in patterns)]
    assert patterns and not unprotected, (unprotected, dump)


def test_nouveau_is_blacklisted(converged: StandinNode) -> None:
    conf = converged.sh("cat /etc/modprobe.d/sdnode-blacklist-nouveau.conf")
    assert re.search(r"^blacklist nouveau$", conf, re.M) and "modeset=0" in conf, conf


def test_persistenced_and_fabric_manager_run(converged: StandinNode) -> None:
    for unit in ("nvidia-persistenced", "nvidia-fabricmanager"):
        state = converged.sh(f"systemctl is-enabled {unit}; systemctl is-active {unit}").split()
        assert state == ["enabled", "active"], (unit, state)


def test_cpu_declared_node_skips_the_role(converged: StandinNode) -> None:
    result = run(converged, "standin-cpu", extra_vars={"sdnode_accelerator": "cpu"}, tags="nvidia_driver")
    assert_idempotent(result)
    assert "nvidia_driver skipped" in result.output, result.explain()


def test_bad_branch_fails_before_any_change(converged: StandinNode) -> None:
    result = run(converged, "standin-bad-branch", extra_vars={"nvidia_driver_branch": "57x"})
    assert result.rc != 0 and result.changed == 0, result.explain()
    assert "nvidia_driver_branch" in result.output, result.explain()


def test_newer_version_published_changes_nothing_without_the_upgrade_path(converged: StandinNode) -> None:
    converged.publish(V1, V2, OTHER_BRANCH)
    assert_idempotent(run(converged, "standin-v2-published"))
    assert set(converged.versions().values()) == {f"{V1}-1"}
    simulated = converged.sh("apt-get -s dist-upgrade")
    assert not re.search(r"^Inst (nvidia|libnvidia|libcuda)", simulated, re.M), simulated


def test_version_change_without_upgrade_path_is_refused(converged: StandinNode) -> None:
    result = run(converged, "standin-v2-refused", extra_vars={"nvidia_driver_version": f"{V2}-1"})
    assert result.rc != 0 and result.changed == 0, result.explain()
    assert "nvidia_driver_upgrade" in result.output, result.explain()
    assert set(converged.versions().values()) == {f"{V1}-1"}


def test_upgrade_path_moves_everything_and_holds_again(converged: StandinNode) -> None:
    upgrade = {"nvidia_driver_upgrade": True}
    result = run(converged, "standin-upgrade", extra_vars=upgrade)
    assert_converged(result)
    assert result.changed > 0, result.explain()
    versions = converged.versions()
    assert versions == {p: f"{V2}-1" for p in DRIVER_PACKAGES}, versions
    assert set(DRIVER_PACKAGES) <= converged.held()
    assert_idempotent(run(converged, "standin-upgrade-idempotence", extra_vars=upgrade))
    assert_idempotent(run(converged, "standin-check", check=True, diff=True))
