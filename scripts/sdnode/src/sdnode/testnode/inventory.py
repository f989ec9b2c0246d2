"""The Ansible inventory of a checkout's running nodes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from sdnode.testnode.checkout import default_inventory_path, key_path, known_hosts_path, state_lock
from sdnode.testnode.fileops import write_file
from sdnode.testnode.processes import TestnodeError
from sdnode.testnode.records import NodeRecord, load_records

GROUP = "sdnodes"


def inventory_data(records: Iterable[NodeRecord], base: Path) -> dict[str, Any]:
    hosts = {}
    for record in sorted(records, key=lambda r: r.name):
        hosts[record.name] = {
            "ansible_host": record.address,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key_path(base)),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts_path(base)} "
            "-o StrictHostKeyChecking=yes",
            "ansible_python_interpreter": "/usr/bin/python3",
            "sdnode_accelerator": "cpu",
        }
    return {"all": {"children": {GROUP: {"hosts": hosts or None}}}}


def write_inventory(base: Path, output: Path | None = None, group_vars: Path | None = None) -> Path:
    """Write the inventory of this checkout's running nodes; with group_vars, link it beside the file."""
    path = (output or default_inventory_path(base)).resolve()
    records = [r for r in load_records() if r.state_dir == str(base) and r.is_running()]
    header = "# Written by `testnode inventory`: the running test nodes of this checkout. Do not edit.\n"
    with state_lock(base):
        write_file(path, header + yaml.safe_dump(inventory_data(records, base), sort_keys=False, width=1000))
    if group_vars is not None:
        target = group_vars.resolve()
        if not target.is_dir():
            raise TestnodeError(f"--group-vars: {group_vars} is not a directory")
        link = path.parent / "group_vars"
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise TestnodeError(f"{link} exists and is not a symlink; remove it or choose another --output")
        link.symlink_to(target)
    return path
