"""nvidia_driver on a GPU-less node, against stand-in packages under NVIDIA's real names.

Repository setup (current cuda-keyring, diverted vendor sources list, Signed-By), branch pin, holds,
unattended-upgrades blacklist, nouveau blacklist, fabric manager version match, the explicit upgrade
path and idempotence all run for real; `nvidia_driver_hardware_checks: false` skips only lspci, Secure
Boot, kernel headers, the loaded-module check, reboot and nvidia-smi (proved by tests/node on GPU nodes).

Then, on the same node, sd_monitor's exporters entry point installs DCGM and its exporter from the same
stand-in repository (packages.yml `dcgm`): exact versions over a newer published pair, the exporter's
pairing checked through its `--version`, holds, the packaged unit with the role's drop-in, the listen
address, check mode and idempotence run for real. The stand-in exporter serves fixed values for a fake
GPU; real telemetry (NVML, nv-hostengine reading GPUs, the exporter through it) needs a GPU node
(tests/node/test_monitor.py there).
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
import yaml
from sdnode.state import cache_dir

from .conftest import STATE, ansible_playbook, assert_converged, assert_idempotent
from .conftest import TestNodes as Nodes  # aliased: pytest would try to collect a Test* name
from .standin.build_repo import publish

pytestmark = pytest.mark.integration

NODE = "drv2"
BRIDGE = "10.213.0.1"  # the host's address on the test-node bridge; the repository is served there only
PLAYBOOK = str(Path(__file__).parent / "standin" / "driver.yml")
DCGM_PLAYBOOK = str(Path(__file__).parent / "standin" / "dcgm.yml")
RULES = Path(__file__).resolve().parents[2] / "roles" / "sd_monitor" / "files" / "prometheus" / "rules"
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


# sd_monitor's defaults; the repository also offers DCGM 1:4.7.0-1 and exporter 4.9.0-1 (paired with it).
DCGM_VERSION, DCGM_EXPORTER_VERSION = "1:4.5.3-1", "4.8.2-1"
DCGM_PACKAGES = {
    "datacenter-gpu-manager-4-core": DCGM_VERSION,
    "datacenter-gpu-manager-4-cuda13": DCGM_VERSION,
    "datacenter-gpu-manager-exporter": DCGM_EXPORTER_VERSION,
}
DCGM_PORT = 9400


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

    def installed(self, packages: list[str]) -> dict[str, str]:
        out = self.testnodes.ssh(
            NODE, "dpkg-query -W -f='${Package} ${Version}\\n' " + " ".join(packages), check=False
        ).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def address(self) -> str:
        """The node's address in the inventory: where its exporters must listen."""
        hosts = yaml.safe_load((self.inventory / "hosts.yml").read_text())
        return hosts["all"]["children"]["sdnodes"]["hosts"][NODE]["ansible_host"]

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


# --- sd_monitor's exporters entry point: DCGM's exporter (after the driver, on the same node) -----------


@pytest.fixture(scope="module")
def dcgm(converged: StandinNode) -> StandinNode:
    """Dry run on a node without DCGM, converge, idempotence, then a dry run on the converged node."""
    assert converged.installed(list(DCGM_PACKAGES)) == {}, "DCGM is already on the node"
    dry = ansible_playbook(DCGM_PLAYBOOK, converged.inventory, label="standin-dcgm-check-fresh", check=True)
    assert_converged(dry)
    assert converged.installed(list(DCGM_PACKAGES)) == {}, "the dry run installed something"
    first = ansible_playbook(DCGM_PLAYBOOK, converged.inventory, label="standin-dcgm-converge")
    assert_converged(first)
    assert "TASK [sd_monitor : DCGM | Install DCGM and its exporter" in first.output, first.explain()
    assert_idempotent(ansible_playbook(DCGM_PLAYBOOK, converged.inventory, label="standin-dcgm-idempotence"))
    assert_idempotent(
        ansible_playbook(
            DCGM_PLAYBOOK, converged.inventory, label="standin-dcgm-check", check=True, diff=True
        )
    )
    return converged


def test_dcgm_installs_one_paired_version_and_holds_it(dcgm: StandinNode) -> None:
    assert dcgm.installed(list(DCGM_PACKAGES)) == DCGM_PACKAGES
    assert set(DCGM_PACKAGES) <= dcgm.held(), dcgm.held()
    # The newer pair is in the repository; the exact versions and the holds keep it out.
    policy = dcgm.sh("apt-cache policy " + " ".join(DCGM_PACKAGES))
    assert "1:4.7.0-1" in policy and "4.9.0-1" in policy, policy
    simulated = dcgm.sh("apt-get -s dist-upgrade")
    assert not re.search(r"^Inst datacenter-gpu-manager", simulated, re.M), simulated
    assert dcgm.sh("dcgm-exporter --version").strip() == "DCGM Exporter version 4.5.3-4.8.2"


@pytest.mark.parametrize("unit", ["nvidia-dcgm", "nvidia-dcgm-exporter"])
def test_dcgm_units_are_enabled_and_running(dcgm: StandinNode, unit: str) -> None:
    state = dcgm.sh(f"systemctl is-enabled {unit}; systemctl is-active {unit}").split()
    assert state == ["enabled", "active"], (unit, state)


def test_dcgm_exporter_listens_on_the_node_address_only(dcgm: StandinNode) -> None:
    listening = dcgm.sh(f"ss -ltnH 'sport = :{DCGM_PORT}'").split("\n")
    local = sorted(line.split()[3] for line in listening if line.strip())
    assert local == [f"{dcgm.address()}:{DCGM_PORT}"], local
    unit = dcgm.sh("systemctl cat nvidia-dcgm-exporter")
    assert "-r localhost:5555" in unit, unit  # through the nvidia-dcgm host engine


def test_dcgm_exporter_serves_what_the_rules_read(dcgm: StandinNode) -> None:
    wanted = set()
    for path in RULES.glob("*.yml"):
        wanted |= set(re.findall(r"\b(DCGM_FI_[A-Z0-9_]+)\{job=\"dcgm\"", path.read_text()))
    assert wanted, "the rules read no DCGM metric"
    metrics = dcgm.sh(f"curl -sf http://{dcgm.address()}:{DCGM_PORT}/metrics")
    served = set(re.findall(r"^(DCGM_FI_[A-Z0-9_]+)\{", metrics, re.M))
    assert wanted <= served, wanted - served


def test_dcgm_version_change_moves_the_held_packages_and_holds_them_again(dcgm: StandinNode) -> None:
    """Changing the version variables is the upgrade path. A mismatched pair fails the run at the pairing
    check, before the role's drop-in and restarts (the packages' versions cannot tell; the binary can)."""
    mismatched = ansible_playbook(
        DCGM_PLAYBOOK,
        dcgm.inventory,
        label="standin-dcgm-mismatch",
        extra_vars={"sd_monitor_dcgm_exporter_version": "4.9.0-1"},
    )
    assert mismatched.rc != 0, mismatched.explain()
    assert "is not the release paired with DCGM" in mismatched.output, mismatched.explain()
    assert "TASK [sd_monitor : DCGM | Exporter's command line" not in mismatched.output, mismatched.explain()
    paired = {"sd_monitor_dcgm_version": "1:4.7.0-1", "sd_monitor_dcgm_exporter_version": "4.9.0-1"}
    upgrade = ansible_playbook(DCGM_PLAYBOOK, dcgm.inventory, label="standin-dcgm-upgrade", extra_vars=paired)
    assert_converged(upgrade)
    assert dcgm.installed(list(DCGM_PACKAGES)) == {
        "datacenter-gpu-manager-4-core": "1:4.7.0-1",
        "datacenter-gpu-manager-4-cuda13": "1:4.7.0-1",
        "datacenter-gpu-manager-exporter": "4.9.0-1",
    }
    assert set(DCGM_PACKAGES) <= dcgm.held(), dcgm.held()
    # Back to the defaults (a downgrade through the same path), as the other tests expect.
    assert_converged(ansible_playbook(DCGM_PLAYBOOK, dcgm.inventory, label="standin-dcgm-back"))
    assert dcgm.installed(list(DCGM_PACKAGES)) == DCGM_PACKAGES
