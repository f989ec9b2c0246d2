"""playbooks/validate.yml fails before any change, naming the variable, for each kind of bad inventory.

It makes no connection to the nodes, so it runs here against inventories of unreachable documentation
addresses (192.0.2.0/24): a check that tried to reach a node would fail the good case.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "ansible_host": "192.0.2.1",
    "sdnode_accelerator": "nvidia",
    "model_cache_source": "hub",
    "model_cache_hub_id": "CompVis/stable-diffusion-v1-4",
    "model_cache_revision": "133a221b8aa7292a167afc5127cb63fb5005638b",
}
BAD = [
    ({"sdnode_accelerator": "gpu"}, "sdnode_accelerator"),
    ({"nvidia_driver_branch": "latest"}, "nvidia_driver_branch"),
    ({"nvidia_driver_branch": "550"}, "nvidia_driver_branch"),
    ({"model_cache_revision": ""}, "model_cache_revision"),
    ({"model_cache_revision": "main"}, "model_cache_revision"),
    ({"model_cache_revision": "133a221b8aa7"}, "model_cache_revision"),
    ({"sd_service_port_base": 70000}, "sd_service_port_base"),
    ({"sd_service_api_keys": []}, "sd_service_api_keys"),
    ({"base_sshd_permit_root_login": "yes"}, "base_sshd_permit_root_login"),
    ({"base_firewall_allowed_networks": ["10.0.0.0/33"]}, "base_firewall_allowed_networks"),
    ({"python_env_keep_releases": 1}, "python_env_keep_releases"),
]


def validate(tmp_path: Path, host_vars: dict) -> subprocess.CompletedProcess:
    inventory = tmp_path / "hosts.yml"
    hosts = {"all": {"children": {"sdnodes": {"hosts": {"node1": host_vars}}}}}
    inventory.write_text(yaml.safe_dump(hosts))
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", str(inventory), str(ROOT / "playbooks" / "validate.yml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_a_good_inventory_passes(tmp_path: Path) -> None:
    proc = validate(tmp_path, GOOD)
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.parametrize(("bad", "named"), BAD, ids=[f"{n}={v[n]}" for v, n in BAD])
def test_a_bad_variable_fails_naming_it(tmp_path: Path, bad: dict, named: str) -> None:
    proc = validate(tmp_path, {**GOOD, **bad})
    assert proc.returncode != 0, f"validate.yml accepted {bad}"
    failure = "\n".join(line for line in proc.stdout.splitlines() if "fatal:" in line or "failed:" in line)
    assert named in failure, proc.stdout[-3000:]


def test_a_wrong_type_or_choice_is_one_short_line_per_variable(tmp_path: Path) -> None:
    proc = validate(tmp_path, {**GOOD, "sd_service_port_base": "seventy", "nvidia_driver_source": "ppa"})
    assert proc.returncode != 0
    lines = proc.stdout.splitlines()
    assert "  sd_service_port_base: expected int, got 'seventy'" in lines, proc.stdout[-3000:]
    assert "  nvidia_driver_source: expected \"\" or ubuntu or cuda_repo, got 'ppa'" in lines
    # Not the module's own message, which dumps the whole argument spec.
    assert "argument_spec_data" not in proc.stdout and max(len(line) for line in lines) < 1000


def test_an_inventory_without_nodes_fails_saying_how_to_make_one(tmp_path: Path) -> None:
    """Before: "no hosts matched" on every play and exit 0; a missing path only a warning."""
    empty = tmp_path / "hosts.yml"
    empty.write_text("all: {}\n")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), PATH=f"{bin_dir}:{os.environ['PATH']}")
    for source, says in (
        (empty, "cp -r inventory.example inventory"),
        (tmp_path / "nope", "cp -r inventory.example inventory"),
    ):
        proc = subprocess.run(
            [str(bin_dir / "ansible-playbook"), "-i", str(source), str(ROOT / "playbooks" / "site.yml")],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert proc.returncode != 0, f"site.yml ran against {source}: {proc.stdout[-2000:]}"
        assert says in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_missing_ssh_key_says_to_run_sdnode_keys(tmp_path: Path) -> None:
    """Before: a raw lookup error about playbooks/../.sdnode/keys/sdnode_ed25519.pub, or ssh failing."""
    missing = tmp_path / "keys" / "sdnode_ed25519"
    proc = validate(tmp_path, {**GOOD, "ansible_ssh_private_key_file": str(missing)})
    assert proc.returncode != 0
    failure = "\n".join(line for line in proc.stdout.splitlines() if "fatal:" in line or "failed:" in line)
    assert f"No SSH key at {missing}" in failure and "sdnode keys" in failure, proc.stdout[-3000:]
    missing.parent.mkdir()
    missing.write_text("a key\n")
    proc = validate(tmp_path, {**GOOD, "ansible_ssh_private_key_file": str(missing)})
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_example_inventory_takes_the_fleet_key_from_the_state_dir(tmp_path: Path) -> None:
    """The public key's lookup follows SDNODE_STATE_DIR (sdnode_fleet_key), not the playbooks' dir."""
    base = yaml.safe_load((ROOT / "inventory.example" / "group_vars" / "sdnodes" / "base.yml").read_text())
    (key,) = base["base_admin_users"][0]["ssh_keys"]
    assert "sdnode_fleet_key ~ '.pub'" in key and "playbook_dir" not in key
    defaults = yaml.safe_load((ROOT / "roles" / "sdnode" / "defaults" / "main.yml").read_text())
    assert defaults["sdnode_fleet_key"] == "{{ sdnode_state_dir }}/keys/sdnode_ed25519"


def validate_fleet(tmp_path: Path, gateway_vars: dict) -> subprocess.CompletedProcess:
    """validate.yml on a node behind one gateway-and-monitor host."""
    inventory = tmp_path / "hosts.yml"
    hosts = {
        "all": {
            "children": {
                "sdnodes": {"hosts": {"node1": GOOD}},
                "sdgateways": {"hosts": {"gw1": gateway_vars}},
                "sdmonitor": {"hosts": {"gw1": None}},
            }
        }
    }
    inventory.write_text(yaml.safe_dump(hosts))
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", str(inventory), str(ROOT / "playbooks" / "validate.yml")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("gateway", "named"),
    [
        ({"ansible_host": "gw1.example.com"}, "gw1.example.com"),  # the nodes' firewalls need an address
        ({"ansible_host": "192.0.2.9", "sd_gateway_tls_certificate": "PEM"}, "sd_gateway_tls_private_key"),
        ({"ansible_host": "192.0.2.9", "sd_gateway_queue_timeout": 0}, "sd_gateway_queue_timeout"),
    ],
    ids=["gateway-by-name", "certificate-without-key", "queue-timeout-0"],
)
def test_a_bad_fleet_fails_before_any_change_naming_it(tmp_path: Path, gateway: dict, named: str) -> None:
    assert validate_fleet(tmp_path, {"ansible_host": "192.0.2.9"}).returncode == 0  # the good fleet
    proc = validate_fleet(tmp_path, gateway)
    assert proc.returncode != 0, f"validate.yml accepted the gateway {gateway}"
    failure = "\n".join(line for line in proc.stdout.splitlines() if "fatal:" in line or "failed:" in line)
    assert named in failure, proc.stdout[-3000:]
