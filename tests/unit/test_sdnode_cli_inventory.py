"""sdnode's inventory resolution: from canned `ansible-inventory --list` JSON and from the real command."""

from __future__ import annotations

import json
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

# As `ansible-inventory -i hosts.yml --list` prints it: group vars already merged into each host.
LISTING = json.loads("""
{
  "_meta": {"hostvars": {
    "gpu1": {"ansible_host": "192.0.2.10", "ansible_port": 2222, "ansible_user": "ops",
             "ansible_become": true, "ansible_ssh_private_key_file": "~/.ssh/fleet",
             "ansible_ssh_common_args": "-o UserKnownHostsFile=/etc/sdnode/known_hosts -o BatchMode=yes",
             "sdnode_accelerator": "nvidia", "sd_service_port_base": 9000},
    "cpu1": {"ansible_host": "192.0.2.11", "sdnode_accelerator": "cpu"},
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
    assert (gpu.accelerator, gpu.service_port(0), gpu.service_port(3)) == ("nvidia", 9000, 9003)
    cpu = nodes["cpu1"]
    assert (cpu.port, cpu.key_file, cpu.known_hosts, cpu.service_port(0)) == (22, None, (), 7860)


def test_host_without_vars_is_reached_by_its_name() -> None:
    bare = {n.name: n for n in nodes_from_listing(LISTING)}["bare1"]
    assert bare.address == "bare1"
    assert bare.accelerator == "nvidia"  # the kit's default accelerator


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
        ({"sd_service_port_base": "{{ base }}"}, "sd_service_port_base"),
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
        n2: {ansible_host: 10.9.0.2, sd_service_port_base: 8000}
    other:
      hosts:
        x1: {}
"""


def test_load_nodes_through_ansible_inventory(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text(HOSTS_YML)
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "sdnodes.yml").write_text("ansible_port: 2022\n")
    nodes = load_nodes(str(tmp_path))
    assert [(n.name, n.address, n.port, n.user, n.accelerator, n.port_base) for n in nodes] == [
        ("n1", "10.9.0.1", 2022, "root", "cpu", 7860),
        ("n2", "10.9.0.2", 2022, "root", "cpu", 8000),
    ]
    assert [n.name for n in load_nodes(str(tmp_path), limit="n2")] == ["n2"]


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
