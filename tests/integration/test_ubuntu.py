"""The kit on Ubuntu 22.04 and 24.04 nodes (debootstrapped from Ubuntu's archive), CPU mode.

What a CPU node here can prove: provision.yml (base; the driver role skips a cpu node) converges, a
second run changes nothing, and the testinfra base suite passes. The service cannot be deployed on
either release here: 22.04 has no final Python 3.11 of its own (its python3.11 is 3.11.0rc1; the role
must refuse it, and does, tested below), and PyTorch's CPU wheels for 24.04's Python 3.12 come from
download.pytorch.org, which this machine cannot reach. The Debian 12 node in test_site.py deploys the
whole service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import (
    STATE,
    PlaybookRun,
    ansible_playbook,
    assert_converged,
    assert_idempotent,
    assert_pytest_passes,
    tool,
)
from .conftest import TestNodes as Nodes  # aliased: pytest would try to collect a Test* name

pytestmark = pytest.mark.integration

RELEASES = {"ubuntu-22.04": "ub22", "ubuntu-24.04": "ub24"}


@dataclass
class Provisioned:
    node: str
    inventory: Path
    converge: PlaybookRun
    idempotence: PlaybookRun


@pytest.fixture(scope="module", params=sorted(RELEASES))
def provisioned(request, testnodes: Nodes) -> Provisioned:
    os_name = request.param
    node = RELEASES[os_name]
    testnodes.up(node, "--os", os_name)
    inventory = testnodes.inventory(STATE / "ci" / node, [node])
    converge = ansible_playbook("provision.yml", inventory, label=f"{node}-provision")
    idempotence = ansible_playbook("provision.yml", inventory, label=f"{node}-provision-again")
    return Provisioned(node, inventory, converge, idempotence)


def test_node_runs_the_release_it_was_built_from(provisioned: Provisioned, testnodes: Nodes) -> None:
    release = testnodes.ssh(provisioned.node, ". /etc/os-release && echo $ID $VERSION_ID").stdout.split()
    wanted = next(name for name, node in RELEASES.items() if node == provisioned.node)
    assert "-".join(release) == wanted


def test_provision_converges_then_changes_nothing(provisioned: Provisioned) -> None:
    assert_converged(provisioned.converge)
    assert provisioned.converge.changed >= 10, provisioned.converge.explain()
    assert_idempotent(provisioned.idempotence)


def test_base_checks_pass(provisioned: Provisioned) -> None:
    assert_pytest_passes(
        [
            tool("pytest"),
            "-p",
            "no:cacheprovider",
            "-q",
            "tests/node/test_base.py",
            "--hosts=ansible://sdnodes",
            f"--ansible-inventory={provisioned.inventory}",
        ]
    )


@pytest.mark.parametrize("provisioned", ["ubuntu-22.04"], indirect=True)
def test_jammy_python_is_refused_naming_the_variable(provisioned: Provisioned, testnodes: Nodes) -> None:
    """Ubuntu 22.04: with no interpreter set, and with jammy's own python3.11 (3.11.0rc1, on which
    torch fails to import), python_env stops at its checks, naming python_env_python, and no
    release is built."""
    # deploy.yml: the service roles on the provisioned node, so the check is reached without base again.
    unset = ansible_playbook("deploy.yml", provisioned.inventory, label="ub22-deploy-no-python")
    assert unset.rc != 0 and "python_env_python must be set on Ubuntu 22.04" in unset.output, unset.explain()
    # What an operator would try next: the archive's python3.11.
    testnodes.ssh(provisioned.node, "DEBIAN_FRONTEND=noninteractive apt-get install -qy python3.11-venv")
    rc1 = ansible_playbook(
        "deploy.yml",
        provisioned.inventory,
        extra_vars={"python_env_python": "/usr/bin/python3.11"},
        label="ub22-deploy-rc-python",
    )
    assert rc1.rc != 0, rc1.explain()
    assert "python_env_python: /usr/bin/python3.11 on ub22 is Python 3.11.0 (candidate, a pre-release)" in (
        rc1.output
    ), rc1.explain()
    for run in (unset, rc1):
        assert run.changed == 0, run.changed_tasks()
    releases = testnodes.ssh(provisioned.node, "ls -A /opt/sdserve/releases 2>/dev/null", check=False).stdout
    assert releases.strip() == "", releases
