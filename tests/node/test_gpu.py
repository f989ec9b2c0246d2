"""GPU checks for nodes declared `sdnode_accelerator: nvidia`, in two tiers.

gpu_runtime: the driver answers and CUDA works from the service's Python.
gpu_node: the driver packages, pins and holds, persistence mode, fabric manager where NVSwitch exists,
and the service unit's device access.

Selection is by declaration only (conftest adds the `nvidia_node` selector to every test here): on a
node declared nvidia nothing is skipped, so a missing nvidia-smi, package or device is a failure.
"""

from __future__ import annotations

import re

import pytest

from .conftest import setting

ROLE = "nvidia_driver"
# Installed packages of the driver stack, which the role must have held.
DRIVER_PACKAGE = re.compile(
    r"^(nvidia-|libnvidia-|libcuda|libnvcuvid|libnvoptix|cuda-drivers|firmware-nvidia-)"
)
VENV_PYTHON = "/opt/sdserve/current/venv/bin/python"


def upstream(version: str) -> str:
    """Package version 570.172.08-1 or 1:570.172.08-0ubuntu1 -> 570.172.08."""
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


def version_package(host, node_vars) -> str:
    branch = str(setting(node_vars, ROLE, "nvidia_driver_branch"))
    source = setting(node_vars, ROLE, "nvidia_driver_source") or (
        "ubuntu" if host.system_info.distribution == "ubuntu" else "cuda_repo"
    )
    if host.system_info.distribution == "ubuntu":
        return f"libnvidia-compute-{branch}-server" if source == "ubuntu" else f"libnvidia-compute-{branch}"
    return "libnvidia-ml1"


@pytest.fixture(scope="module")
def smi(host) -> list[list[str]]:
    """nvidia-smi's view of every GPU: index, name, driver version, persistence mode."""
    out = host.run("nvidia-smi --query-gpu=index,name,driver_version,persistence_mode --format=csv,noheader")
    assert out.rc == 0, (
        f"nvidia-smi failed on a node declared nvidia (rc={out.rc}): {out.stderr or out.stdout}"
    )
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    assert rows, "nvidia-smi lists no GPU"
    return rows


@pytest.fixture(scope="module")
def installed_driver(host, node_vars) -> str:
    package = host.package(version_package(host, node_vars))
    assert package.is_installed, f"{package.name} is not installed"
    return package.version


# --- gpu_runtime ---------------------------------------------------------------------------------


@pytest.mark.gpu_runtime
def test_nvidia_smi_reports_the_installed_driver_on_every_gpu(smi, installed_driver) -> None:
    assert {row[2] for row in smi} == {upstream(installed_driver)}, smi


@pytest.mark.gpu_runtime
def test_loaded_module_matches_user_space(host, installed_driver) -> None:
    loaded = host.file("/proc/driver/nvidia/version")
    assert loaded.exists, "the nvidia kernel module is not loaded"
    match = re.search(r"Kernel Module\s+([0-9.]+)", loaded.content_string)
    assert match and match.group(1) == upstream(installed_driver), loaded.content_string


@pytest.mark.gpu_runtime
def test_torch_sees_every_gpu(host, smi) -> None:
    probe = host.run(
        f"{VENV_PYTHON} -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.device_count())'"
    )
    assert probe.rc == 0, probe.stderr
    assert int(probe.stdout.strip()) == len(smi)


@pytest.mark.gpu_runtime
def test_cuda_computes(host) -> None:
    script = 'import torch; x = torch.ones(256, 256, device="cuda"); print(int((x @ x).sum().item()))'
    probe = host.run(f"{VENV_PYTHON} -c '{script}'")
    assert probe.rc == 0, probe.stderr
    assert probe.stdout.strip() == str(256 * 256 * 256)


# --- gpu_node ------------------------------------------------------------------------------------


@pytest.mark.gpu_node
def test_every_installed_driver_package_is_held(host) -> None:
    listing = host.check_output("dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n'")
    installed = {line.split()[-1] for line in listing.splitlines() if line[:2] in ("ii", "hi")}
    stack = {p for p in installed if DRIVER_PACKAGE.match(p) and p != "cuda-keyring"}
    assert stack, "no NVIDIA driver package is installed"
    held = set(host.check_output("apt-mark showhold").split())
    assert stack <= held, f"not held: {sorted(stack - held)}"


@pytest.mark.gpu_node
def test_driver_branch_is_pinned(host, node_vars, installed_driver) -> None:
    branch = str(setting(node_vars, ROLE, "nvidia_driver_branch"))
    exact = setting(node_vars, ROLE, "nvidia_driver_version")
    pin = host.file("/etc/apt/preferences.d/sdnode-nvidia-driver").content_string
    expected = exact or f"{branch}.*"
    assert re.search(rf"^Pin: version {re.escape(expected)}$", pin, re.M), pin
    assert upstream(installed_driver).startswith(f"{branch}."), installed_driver


@pytest.mark.gpu_node
def test_nouveau_is_blacklisted_and_not_loaded(host) -> None:
    assert "blacklist nouveau" in host.file("/etc/modprobe.d/sdnode-blacklist-nouveau.conf").content_string
    loaded = host.run("grep -c '^nouveau ' /proc/modules")
    assert loaded.stdout.strip() == "0", f"nouveau loaded, or no /proc/modules: {loaded.stdout}"


@pytest.mark.gpu_node
def test_persistence_mode_is_on(host, smi, node_vars) -> None:
    if not setting(node_vars, ROLE, "nvidia_driver_persistence_mode"):
        pytest.skip("nvidia_driver_persistence_mode is false on this node")
    service = host.service("nvidia-persistenced")
    assert service.is_enabled and service.is_running
    assert {row[3] for row in smi} == {"Enabled"}, smi


@pytest.mark.gpu_node
def test_fabric_manager_matches_the_driver_where_nvswitch_exists(host, installed_driver, node_vars) -> None:
    nvswitch = host.run("lspci -n -d 10de::0680").stdout.strip()
    service = host.service("nvidia-fabricmanager")
    if not nvswitch:
        # Without NVSwitch the fabric manager has nothing to manage and would fail to start.
        assert not service.is_running, "nvidia-fabricmanager runs on a node without NVSwitch"
        return
    assert service.is_enabled and service.is_running
    branch = str(setting(node_vars, ROLE, "nvidia_driver_branch"))
    fm = host.package(f"nvidia-fabricmanager-{branch}")
    assert fm.is_installed and upstream(fm.version) == upstream(installed_driver), fm.version


@pytest.mark.gpu_node
def test_service_units_may_use_the_gpus(host) -> None:
    units = host.check_output("systemctl list-units --all --plain --no-legend 'sdserve@*.service'")
    names = [line.split()[0] for line in units.splitlines() if line.strip()]
    assert names, "no sdserve@N unit on this node"
    for unit in names:
        allow = host.check_output(f"systemctl show {unit} -p DeviceAllow --value")
        assert "/dev/nvidiactl" in allow or "nvidia" in allow, (unit, allow)
        env = host.check_output(f"systemctl show {unit} -p Environment --value")
        index = unit.split("@", 1)[1].split(".")[0]
        assert f"CUDA_VISIBLE_DEVICES={index}" in env, (unit, env)
