"""Inventories for throwaway nodes on this machine (demo and integration suite).

`testnode inventory` lists every running node; this narrows it to the nodes a caller owns and links the
shared local group_vars (inventory.local/) into it, so the demo and the tests deploy with one set of settings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def venv_tool(name: str) -> str:
    """A console script next to this interpreter (the controller venv), else from PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def build_inventory(
    path: Path,
    nodes: list[str],
    group_vars: Path,
    host_vars: dict[str, dict] | None = None,
    fleet: dict[str, list[str]] | None = None,
) -> Path:
    """Write `path/hosts.yml` holding only `nodes` (the sdnodes group), with `group_vars` linked and
    optional host_vars. `fleet` adds groups of further running test nodes:
    {"sdgateways": [...], "sdmonitor": [...]}."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    listing = path / "all-nodes.yml"
    subprocess.run(
        [venv_tool("testnode"), "inventory", "--output", str(listing)], check=True, capture_output=True
    )
    data = yaml.safe_load(listing.read_text())
    listing.unlink()
    group = data["all"]["children"]["sdnodes"]
    running = group.get("hosts") or {}
    others = {name: members for name, members in (fleet or {}).items() if members}
    missing = sorted({n for n in nodes + [m for ms in others.values() for m in ms] if n not in running})
    if missing:
        raise RuntimeError(f"no running test node named {', '.join(missing)} (see `testnode list`)")
    group["hosts"] = {n: running[n] for n in nodes}
    for name, members in others.items():
        # Only the connection: a gateway or monitor host serves nothing, so it declares no accelerator.
        hosts = {m: {k: v for k, v in running[m].items() if k != "sdnode_accelerator"} for m in members}
        data["all"]["children"][name] = {"hosts": {m: (None if m in nodes else hosts[m]) for m in members}}
    (path / "hosts.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    (path / "group_vars").symlink_to(group_vars.resolve())
    if host_vars:
        (path / "host_vars").mkdir()
        for host, values in host_vars.items():
            (path / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump(values, sort_keys=False))
    return path
