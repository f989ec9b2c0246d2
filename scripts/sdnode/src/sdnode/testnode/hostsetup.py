"""The host packages test nodes need: checking for them, and `testnode host-setup` installing them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdnode.testnode.processes import Log, TestnodeError, require_root, run

# prometheus is for the controller, not the nodes: its promtool checks and tests sd_monitor's rules.
HOST_PACKAGES = (
    "debootstrap",
    "systemd-container",
    "nftables",
    "iproute2",
    "openssh-client",
    "rsync",
    "prometheus",
)
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nft": "nftables",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}


def require_host_tools() -> None:
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise TestnodeError(f"missing host packages: {', '.join(missing)}; run `testnode host-setup` as root")


def missing_host_packages() -> list[str]:
    missing = []
    for package in HOST_PACKAGES:
        result = run(["dpkg-query", "-W", "-f=${Status}", package], check=False)
        if result.returncode != 0 or "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def host_setup(log: Log = print) -> list[str]:
    require_root("host-setup")
    missing = missing_host_packages()
    if not missing:
        log(f"host packages present: {', '.join(HOST_PACKAGES)}")
        return []
    log(f"installing {', '.join(missing)} ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env, timeout=1200)
    if "prometheus" in missing and Path("/run/systemd/system").is_dir():
        # Only promtool is wanted; Debian's package also starts a server on :9090.
        run(["systemctl", "disable", "--now", "prometheus.service"], check=False)
    log(f"installed {', '.join(missing)}")
    return missing
