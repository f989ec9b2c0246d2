"""testinfra suite for deployed nodes, real or throwaway.

    pytest tests/node --hosts=ansible://sdnodes --ansible-inventory=INVENTORY
    pytest tests/node --hosts=local:// --node-vars vars.yml     # on the node itself

What a node is expected to have comes from the same inventory the playbooks used
(`host.ansible.get_variables()` plus the roles' defaults), so the checks follow the node's declaration:
GPU checks run exactly on nodes declared `sdnode_accelerator: nvidia`, and there they fail, never skip,
when something is missing.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@cache
def role_defaults(role: str) -> dict:
    path = REPO / "roles" / role / "defaults" / "main.yml"
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


def pytest_addoption(parser):
    parser.addoption(
        "--node-vars",
        metavar="YAML",
        help="the node's variables from a YAML file instead of the Ansible inventory, for a run on the "
        "node itself without a controller: pytest tests/node --hosts=local:// --node-vars vars.yml",
    )


@pytest.fixture(scope="module")
def node_vars(host, request) -> dict:
    """Inventory variables of the host under test (host_vars, group_vars), as Ansible sees them."""
    path = request.config.getoption("--node-vars")
    if path:
        return yaml.safe_load(Path(path).read_text()) or {}
    return host.ansible.get_variables()


def setting(node_vars: dict, role: str, name: str):
    """A role variable as the node got it: inventory value, else the role default (templates resolved
    by Ansible are not re-rendered here, so only use this for plain values)."""
    return node_vars.get(name, role_defaults(role).get(name))


@pytest.fixture(scope="module")
def accelerator(node_vars) -> str:
    value = node_vars.get("sdnode_accelerator")
    assert value in ("nvidia", "cpu"), f"sdnode_accelerator must be declared per node, got {value!r}"
    return value


@pytest.fixture
def nvidia_node(accelerator) -> None:
    """Selects GPU checks by declaration: on a node declared cpu they do not apply."""
    if accelerator != "nvidia":
        pytest.skip("node declared sdnode_accelerator: cpu")


def pytest_collection_modifyitems(items):
    # Every GPU-tier test goes through the nvidia_node selector, so a tier marker alone is enough.
    for item in items:
        if item.get_closest_marker("gpu_runtime") or item.get_closest_marker("gpu_node"):
            item.fixturenames.insert(0, "nvidia_node")
