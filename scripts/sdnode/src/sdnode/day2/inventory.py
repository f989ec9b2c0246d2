"""Nodes from the same inventory Ansible uses, through `ansible-inventory --list` (never parsed by hand),
so every inventory source, group_vars and host_vars behave as they do for the playbooks."""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdnode.day2 import Day2Error
from sdnode.localinv import venv_tool
from sdnode.state import find_repo_root

GROUP = "sdnodes"
DEFAULT_PORT_BASE = 7860
ACCELERATORS = ("nvidia", "cpu")
INVENTORY_ENV = "SDNODE_INVENTORY"
DEFAULT_INVENTORY = "inventory"
# ssh options Paramiko cannot honour the way OpenSSH does: refuse rather than connect some other way.
UNSUPPORTED_SSH_OPTIONS = ("proxyjump", "proxycommand", "hostkeyalias")


@dataclass(frozen=True)
class Node:
    """One inventory host, as far as sdnode needs it to reach the node and its service."""

    name: str  # inventory_hostname
    address: str  # ansible_host, else the name
    port: int = 22
    user: str = "root"
    key_file: Path | None = None
    known_hosts: tuple[
        Path, ...
    ] = ()  # empty: OpenSSH's defaults (~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts)
    become: bool = False
    accelerator: str = "nvidia"
    port_base: int = DEFAULT_PORT_BASE
    vars: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def service_port(self, instance: int) -> int:
        return self.port_base + instance

    def sudo(self, command: str) -> str:
        """`command` as root: as is for root, via non-interactive sudo when the inventory says become."""
        if self.user == "root" or not self.become:
            return command
        return f"sudo -n -- sh -c {shlex.quote(command)}"


def default_inventory() -> str:
    return os.environ.get(INVENTORY_ENV) or DEFAULT_INVENTORY


def _check_plain(host: str, key: str, value: Any) -> Any:
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        raise Day2Error(
            f"host {host}: {key} is a Jinja template ({value!r}); sdnode reads the inventory without "
            f"templating, so set a plain value for it in the inventory"
        )
    if isinstance(value, dict) and "__ansible_vault" in value:
        raise Day2Error(f"host {host}: {key} is vault-encrypted; sdnode needs it in the clear")
    return value


def _as_int(host: str, key: str, value: Any) -> int:
    value = _check_plain(host, key, value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Day2Error(f"host {host}: {key} must be an integer, got {value!r}") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def parse_ssh_args(host: str, *arg_strings: str) -> dict[str, list[str]]:
    """OpenSSH `-o Key=Value` / `-oKey=Value` / `-o "Key Value"` / `-i FILE` / `-p PORT` from the inventory's
    ssh argument strings, keys lower-cased; every value of a repeated option, in order."""
    options: dict[str, list[str]] = {}
    for text in arg_strings:
        if not text:
            continue
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise Day2Error(f"host {host}: cannot parse ssh arguments {text!r}: {exc}") from None
        i = 0
        while i < len(words):
            word = words[i]
            flag, inline = word[:2], word[2:]
            if flag in ("-o", "-i", "-p"):
                if inline:
                    value = inline
                elif i + 1 < len(words):
                    i += 1
                    value = words[i]
                else:
                    raise Day2Error(f"host {host}: ssh argument {word} lacks a value in {text!r}")
                if flag == "-o":
                    key, sep, val = value.partition("=")
                    if not sep:
                        key, _, val = value.partition(" ")
                    options.setdefault(key.strip().lower(), []).append(val.strip())
                else:
                    options.setdefault(flag, []).append(value)
            i += 1
    return options


def node_from_vars(name: str, hostvars: dict[str, Any]) -> Node:
    """A Node from one host's variables as `ansible-inventory --list` gives them."""
    v = hostvars
    address = _check_plain(name, "ansible_host", v.get("ansible_host") or v.get("ansible_ssh_host") or name)
    ssh = parse_ssh_args(
        name,
        str(_check_plain(name, "ansible_ssh_common_args", v.get("ansible_ssh_common_args") or "")),
        str(_check_plain(name, "ansible_ssh_extra_args", v.get("ansible_ssh_extra_args") or "")),
    )
    for option in UNSUPPORTED_SSH_OPTIONS:
        if option in ssh:
            raise Day2Error(
                f"host {name}: ssh option {option} in ansible_ssh_common_args/extra_args is not supported by "
                f"sdnode (Paramiko); reach the node directly"
            )
    port_value = v.get("ansible_port", v.get("ansible_ssh_port"))
    if port_value is None and "-p" in ssh:
        port_value = ssh["-p"][-1]
    port = _as_int(name, "ansible_port", port_value) if port_value is not None else 22
    user = (
        _check_plain(name, "ansible_user", v.get("ansible_user") or v.get("ansible_ssh_user"))
        or getpass.getuser()
    )
    key = v.get("ansible_ssh_private_key_file") or v.get("ansible_private_key_file")
    if not key and "-i" in ssh:
        key = ssh["-i"][0]
    key_file = Path(_check_plain(name, "ansible_ssh_private_key_file", key)).expanduser() if key else None
    known: list[Path] = []
    for files in ssh.get("userknownhostsfile", []):
        known.extend(Path(f).expanduser() for f in files.split() if f.lower() != "none")
    accelerator = _check_plain(name, "sdnode_accelerator", v.get("sdnode_accelerator", "nvidia"))
    if accelerator not in ACCELERATORS:
        raise Day2Error(
            f"host {name}: sdnode_accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}"
        )
    port_base = _as_int(name, "sd_service_port_base", v.get("sd_service_port_base", DEFAULT_PORT_BASE))
    return Node(
        name=name,
        address=str(address),
        port=port,
        user=str(user),
        key_file=key_file,
        known_hosts=tuple(known),
        become=_as_bool(_check_plain(name, "ansible_become", v.get("ansible_become", False))),
        accelerator=accelerator,
        port_base=port_base,
        vars=dict(v),
    )


def group_members(listing: dict[str, Any], group: str) -> set[str]:
    """Hosts of `group` and of its child groups, recursively, in an `ansible-inventory --list` listing."""
    seen: set[str] = set()
    hosts: set[str] = set()
    pending = [group]
    while pending:
        g = pending.pop()
        if g in seen:
            continue
        seen.add(g)
        entry = listing.get(g) or {}
        hosts.update(entry.get("hosts") or [])
        pending.extend(entry.get("children") or [])
    return hosts


def nodes_from_listing(listing: dict[str, Any], group: str = GROUP) -> list[Node]:
    hostvars = (listing.get("_meta") or {}).get("hostvars") or {}
    return [node_from_vars(name, hostvars.get(name) or {}) for name in sorted(group_members(listing, group))]


def inventory_error(stderr: str, rc: int) -> str:
    """The telling line of ansible-inventory's stderr: the first parse failure and where, else the last."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    origin = next((ln for ln in lines if ln.startswith("Origin:")), "")
    for line in lines:
        if "Failed to parse" in line or "Unable to parse" in line:
            message = re.sub(r"^\[(WARNING|ERROR)\]:\s*", "", line)
            return f"{message} ({origin})" if origin else message
    return re.sub(r"^\[(WARNING|ERROR)\]:\s*", "", lines[-1]) if lines else f"rc={rc}"


def ansible_inventory_list(inventory: str, limit: str | None = None) -> dict[str, Any]:
    """The `ansible-inventory --list` JSON of `inventory` (ansible-inventory from this interpreter's venv)."""
    if "," not in inventory and not Path(inventory).exists():
        raise Day2Error(
            f"inventory {inventory!r} not found; pass -i/--inventory or set {INVENTORY_ENV} "
            f"(start from inventory.example/)"
        )
    argv = [venv_tool("ansible-inventory"), "-i", inventory, "--list"]
    if limit:
        argv += ["--limit", limit]
    # A source that no plugin can parse is an error, not an empty inventory with a warning.
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="1")
    root = find_repo_root()
    if "ANSIBLE_CONFIG" not in env and root is not None and (root / "ansible.cfg").exists():
        env["ANSIBLE_CONFIG"] = str(root / "ansible.cfg")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise Day2Error(
            "ansible-inventory not found; install the controller requirements (ansible/requirements.txt)"
        ) from None
    except subprocess.TimeoutExpired:
        raise Day2Error(f"ansible-inventory -i {inventory} took over 120 s") from None
    if proc.returncode != 0:
        raise Day2Error(
            f"ansible-inventory -i {inventory} failed: {inventory_error(proc.stderr, proc.returncode)}"
        )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise Day2Error(f"ansible-inventory -i {inventory} gave no JSON: {exc}") from None


def load_nodes(inventory: str, limit: str | None = None, group: str = GROUP) -> list[Node]:
    """The nodes of `group` in `inventory`, narrowed by an Ansible `--limit` pattern; at least one."""
    nodes = nodes_from_listing(ansible_inventory_list(inventory, limit), group)
    if not nodes:
        where = f" matching --limit {limit!r}" if limit else ""
        raise Day2Error(f"no host in group {group}{where} in inventory {inventory}")
    return nodes


def find_host(inventory: str, host: str) -> Node | None:
    """The inventory host named `host` (in any group), or None when the inventory lacks it or is absent."""
    if "," not in inventory and not Path(inventory).exists():
        return None
    listing = ansible_inventory_list(inventory)
    hostvars = (listing.get("_meta") or {}).get("hostvars") or {}
    names = group_members(listing, "all") | set(hostvars)
    if host not in names:
        return None
    return node_from_vars(host, hostvars.get(host) or {})
