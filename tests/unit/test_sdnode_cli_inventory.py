"""sdnode's inventory resolution: from canned `ansible-inventory --list` JSON and from the real command."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
from sdnode.day2 import Day2Error
from sdnode.day2.inventory import (
    group_members,
    inventory_error,
    load_nodes,
    node_from_vars,
    nodes_from_listing,
    parse_ssh_args,
)
from sdnode.day2.service import api_key, node_api_key
from sdnode.localinv import venv_tool

# As `ansible-inventory -i hosts.yml --list` prints it: group vars already merged into each host.
LISTING = json.loads("""
{
  "_meta": {"hostvars": {
    "gpu1": {"ansible_host": "192.0.2.10", "ansible_port": 2222, "ansible_user": "ops",
             "ansible_become": true, "ansible_ssh_private_key_file": "~/.ssh/fleet",
             "ansible_ssh_common_args": "-o UserKnownHostsFile=/etc/sdnode/known_hosts -o BatchMode=yes",
             "sdnode_accelerator": "nvidia"},
    "cpu1": {"ansible_host": "192.0.2.11", "sdnode_accelerator": "cpu"},
    "bare1": {"sdnode_accelerator": "cpu"},
    "db1": {"ansible_host": "192.0.2.50"}
  }},
  "all": {"children": ["ungrouped", "sdnodes", "databases"]},
  "sdnodes": {"hosts": ["cpu1"], "children": ["rack_a"]},
  "rack_a": {"hosts": ["gpu1", "bare1"]},
  "databases": {"hosts": ["db1"]}
}
""")


def test_group_members_follow_child_groups() -> None:
    assert group_members(LISTING, "sdnodes") == {"cpu1", "gpu1", "bare1"}
    assert group_members(LISTING, "all") == {"cpu1", "gpu1", "bare1", "db1"}


def test_nodes_take_address_port_user_key_known_hosts_and_become() -> None:
    nodes = {n.name: n for n in nodes_from_listing(LISTING)}
    assert sorted(nodes) == ["bare1", "cpu1", "gpu1"]  # db1 is not in sdnodes
    gpu = nodes["gpu1"]
    assert (gpu.address, gpu.port, gpu.user, gpu.become) == ("192.0.2.10", 2222, "ops", True)
    assert gpu.key_file == Path("~/.ssh/fleet").expanduser()
    assert gpu.known_hosts == (Path("/etc/sdnode/known_hosts"),)
    assert gpu.accelerator == "nvidia"
    cpu = nodes["cpu1"]
    assert (cpu.port, cpu.key_file, cpu.known_hosts, cpu.accelerator) == (22, None, (), "cpu")


def test_host_without_an_address_is_reached_by_its_name() -> None:
    bare = {n.name: n for n in nodes_from_listing(LISTING)}["bare1"]
    assert bare.address == "bare1"


def test_a_node_without_an_accelerator_is_refused_not_guessed() -> None:
    """The roles would take it as cpu, sdnode once took it as nvidia: no default anywhere, one line."""
    listing = copy.deepcopy(LISTING)
    del listing["_meta"]["hostvars"]["gpu1"]["sdnode_accelerator"]
    with pytest.raises(Day2Error) as err:
        nodes_from_listing(listing)
    assert str(err.value) == "host gpu1: sdnode_accelerator is not set; declare nvidia or cpu for it"
    # A host outside sdnodes (bootstrap by inventory name) needs none.
    assert node_from_vars("db1", {}).accelerator is None


@pytest.mark.parametrize(
    "args, key, expected",
    [
        ("-o UserKnownHostsFile=/a/kh", "userknownhostsfile", ["/a/kh"]),
        ("-oUserKnownHostsFile=/a/kh", "userknownhostsfile", ["/a/kh"]),
        ("-o 'UserKnownHostsFile /a/kh /b/kh'", "userknownhostsfile", ["/a/kh /b/kh"]),
        ("-o StrictHostKeyChecking=yes -i /k/id", "-i", ["/k/id"]),
        ("-p 2200", "-p", ["2200"]),
    ],
)
def test_parse_ssh_args_forms(args: str, key: str, expected: list[str]) -> None:
    assert parse_ssh_args("h", args)[key] == expected


def test_several_known_hosts_files_in_one_option() -> None:
    node = node_from_vars("h", {"ansible_ssh_common_args": "-o 'UserKnownHostsFile /a/kh /b/kh'"})
    assert node.known_hosts == (Path("/a/kh"), Path("/b/kh"))


def test_port_and_key_from_ssh_args_when_no_ansible_var() -> None:
    node = node_from_vars("h", {"ansible_ssh_extra_args": "-p 2200 -i /k/id"})
    assert (node.port, node.key_file) == (2200, Path("/k/id"))


@pytest.mark.parametrize(
    "hostvars, names",
    [
        ({"sdnode_accelerator": "tpu"}, "sdnode_accelerator"),
        ({"ansible_port": "twenty-two"}, "ansible_port"),
        ({"ansible_user": "{{ deploy_user }}"}, "ansible_user"),
        ({"ansible_host": "{{ lookup('env', 'X') }}"}, "ansible_host"),
        ({"ansible_ssh_common_args": "-o ProxyJump=bastion"}, "proxyjump"),
        ({"ansible_ssh_common_args": "-o 'unbalanced"}, "cannot parse ssh arguments"),
    ],
)
def test_bad_host_vars_name_the_host_and_variable(hostvars: dict, names: str) -> None:
    with pytest.raises(Day2Error) as err:
        node_from_vars("node7", hostvars)
    assert "node7" in str(err.value) and names in str(err.value)


def test_sudo_only_for_non_root_with_become() -> None:
    assert node_from_vars("h", {"ansible_user": "root", "ansible_become": True}).sudo("cat /x") == "cat /x"
    assert node_from_vars("h", {"ansible_user": "ops"}).sudo("cat /x") == "cat /x"
    assert (
        node_from_vars("h", {"ansible_user": "ops", "ansible_become": "yes"}).sudo("cat /x")
        == "sudo -n -- sh -c 'cat /x'"
    )


def test_inventory_error_picks_the_parse_failure() -> None:
    stderr = (
        "[WARNING]: Failed to parse inventory with 'auto' plugin: YAML parsing failed: bad\n\n"
        "Origin: /i/h.yml:2:1\n"
        "[ERROR]: No inventory was parsed, please check your configuration and options.\n"
    )
    assert (
        inventory_error(stderr, 1)
        == "Failed to parse inventory with 'auto' plugin: YAML parsing failed: bad (Origin: /i/h.yml:2:1)"
    )
    assert inventory_error("", 5) == "rc=5"


# The real ansible-inventory, as the CLI runs it.

HOSTS_YML = """
all:
  children:
    sdnodes:
      vars: {sdnode_accelerator: cpu, ansible_user: root}
      hosts:
        n1: {ansible_host: 10.9.0.1}
        n2: {ansible_host: 10.9.0.2, ansible_user: ops}
    other:
      hosts:
        x1: {}
"""


def test_load_nodes_through_ansible_inventory(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text(HOSTS_YML)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "sdnodes.yml").write_text("ansible_port: 2022\n")
    nodes = load_nodes(str(tmp_path))
    assert [(n.name, n.address, n.port, n.user, n.accelerator) for n in nodes] == [
        ("n1", "10.9.0.1", 2022, "root", "cpu"),
        ("n2", "10.9.0.2", 2022, "ops", "cpu"),
    ]
    assert [n.name for n in load_nodes(str(tmp_path), limit="n2")] == ["n2"]


def test_nodes_behind_gateways_use_the_fleets_generated_key_even_when_limited(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text(HOSTS_YML)
    assert not any(n.fleet for n in load_nodes(str(tmp_path)))
    (tmp_path / "hosts.yml").write_text(HOSTS_YML + "    sdgateways:\n      hosts:\n        gw1: {}\n")
    limited = load_nodes(str(tmp_path), limit="n2")  # --limit leaves the gateways out of the listing
    assert [(n.name, n.fleet) for n in limited] == [("n2", True)]
    keys = tmp_path / "state" / "api-keys"
    keys.mkdir(parents=True)
    (keys / "n2.default.key").write_text("the-node-s-own-key-0000\n")
    (keys / "fleet.default.key").write_text("the-fleet-s-key-000000\n")
    assert node_api_key(tmp_path / "state", limited[0]) == "the-fleet-s-key-000000"


def test_limit_matching_nothing_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text(HOSTS_YML)
    with pytest.raises(Day2Error, match="no host in group sdnodes matching --limit 'x1'"):
        load_nodes(str(tmp_path), limit="x1")


def test_unparsable_inventory_is_an_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "hosts.yml"
    bad.write_text("all: [\n")
    with pytest.raises(Day2Error, match=r"failed: .*hosts\.yml"):
        load_nodes(str(bad))


def test_missing_inventory_says_how_to_name_one(tmp_path: Path) -> None:
    with pytest.raises(Day2Error, match="SDNODE_INVENTORY"):
        load_nodes(str(tmp_path / "nope"))


@pytest.mark.parametrize("content", [None, "all: {}\n", "all: [\n"], ids=["missing", "empty", "unparsable"])
def test_sdnode_hosts_stops_the_make_targets_naming_the_path(tmp_path: Path, content: str | None) -> None:
    inventory = tmp_path / "hosts.yml"
    if content is not None:
        inventory.write_text(content)
    proc = subprocess.run(
        [venv_tool("sdnode"), "hosts", "-i", str(inventory)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and str(inventory) in proc.stderr, proc.stderr
    if content != "all: [\n":
        assert "cp -r inventory.example inventory" in proc.stderr


def test_api_key_from_a_vault_encrypted_host_vars_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys kept in Ansible Vault: ansible-inventory decrypts the file with the configured vault password,
    and the first of sd_service_api_keys is the key, not the generated one."""
    (tmp_path / "hosts.yml").write_text(HOSTS_YML)
    (tmp_path / "host_vars").mkdir()
    secret = tmp_path / "host_vars" / "n1.yml"
    secret.write_text("sd_service_api_keys:\n  - {name: ops, key: vaulted-key-0123456789}\n")
    password = tmp_path / "vault-pass"
    password.write_text("correct horse\n")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(password))
    encrypt = [venv_tool("ansible-vault"), "encrypt", str(secret)]
    subprocess.run(encrypt, check=True, capture_output=True)
    assert secret.read_text().startswith("$ANSIBLE_VAULT;")
    state = tmp_path / "state"
    (state / "api-keys").mkdir(parents=True)
    (state / "api-keys" / "n1.default.key").write_text("generated-key-000000\n")
    node = load_nodes(str(tmp_path), limit="n1")[0]
    assert api_key(state, node.name, node.vars) == "vaulted-key-0123456789"


def test_api_key_written_as_the_roles_comment_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pattern roles/sd_service documents: `key: "{{ vault_sdserve_ops_key }}"`, the value an inline
    !vault string. Only Ansible can render that; sdnode asks it (ansible -m debug, no connection)."""
    inventory = tmp_path / "inventory"
    (inventory / "host_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(HOSTS_YML)
    password = tmp_path / "vault-pass"
    password.write_text("correct horse\n")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(password))
    encrypt = [
        venv_tool("ansible-vault"),
        "encrypt_string",
        "inline-vault-key-0123456789",
        "--name",
        "vault_sdserve_ops_key",
    ]
    vaulted = subprocess.run(encrypt, check=True, capture_output=True, text=True).stdout
    (inventory / "host_vars" / "n1.yml").write_text(
        vaulted + 'sd_service_api_keys:\n  - {name: ops, key: "{{ vault_sdserve_ops_key }}"}\n'
    )
    state = tmp_path / "state"
    (state / "api-keys").mkdir(parents=True)
    (state / "api-keys" / "n1.default.key").write_text("generated-key-000000\n")
    node = load_nodes(str(inventory), limit="n1")[0]
    assert node_api_key(state, node) == "inline-vault-key-0123456789"
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(tmp_path / "no-such-password"))
    with pytest.raises(Day2Error, match=r"n1.*sd_service_api_keys"):
        node_api_key(state, node)
