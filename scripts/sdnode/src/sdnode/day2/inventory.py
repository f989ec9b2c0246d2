"""Nodes from the same inventory Ansible uses, through `ansible-inventory --list` (never parsed by hand),
so every inventory source, group_vars and host_vars behave as they do for the playbooks."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdnode.day2 import Day2Error
from sdnode.localinv import venv_tool
from sdnode.state import find_repo_root

GROUP = "sdnodes"
GATEWAY_GROUP = "sdgateways"  # HAProxy in front of the sdnodes (issue #13); may be empty
ACCELERATORS = ("nvidia", "cpu")
INVENTORY_ENV = "SDNODE_INVENTORY"
DEFAULT_INVENTORY = "inventory"
MAKE_ONE = (
    f"make one with `cp -r inventory.example inventory` and list the nodes in its hosts.yml, "
    f"or name yours with -i, INVENTORY= (make) or {INVENTORY_ENV}"
)
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
    accelerator: str | None = None  # nvidia or cpu; None only for a host outside sdnodes (bootstrap)
    vars: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Behind gateways (the inventory has sdgateways hosts): the deploy generated fleet-wide keys.
    fleet: bool = False
    inventory: str = field(default="", compare=False, repr=False)  # where it came from, to render vars

    def sudo(self, command: str) -> str:
        """`command` as root: as is for root, via non-interactive sudo when the inventory says become."""
        if self.user == "root" or not self.become:
            return command
        return f"sudo -n -- sh -c {shlex.quote(command)}"


def default_inventory() -> str:
    return os.environ.get(INVENTORY_ENV) or DEFAULT_INVENTORY


def needs_rendering(value: Any) -> bool:
    """Holds a Jinja template or an inline !vault value somewhere: only Ansible can give it."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return "__ansible_vault" in value or any(needs_rendering(v) for v in value.values())
    if isinstance(value, list):
        return any(needs_rendering(v) for v in value)
    return False


def plain(host: str, key: str, value: Any) -> Any:
    """`value` as ansible-inventory gave it, refused when only templating or decrypting would give it."""
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        raise Day2Error(
            f"host {host}: {key} is a Jinja template ({value!r}); sdnode reads the inventory without "
            f"templating, so set a plain value for it in the inventory"
        )
    if isinstance(value, dict) and "__ansible_vault" in value:
        # ansible-inventory decrypts vars files encrypted whole, never inline !vault values.
        raise Day2Error(
            f"host {host}: {key} is an inline !vault value; put it in a vars file encrypted whole "
            f"(ansible-vault encrypt) and configure the vault password (ANSIBLE_VAULT_PASSWORD_FILE)"
        )
    return value


def role_default(role: str, name: str) -> Any:
    """`name` from roles/<role>/defaults/main.yml: what the deploy used where the inventory says nothing."""
    path = (find_repo_root() or Path.cwd()) / "roles" / role / "defaults" / "main.yml"
    try:
        defaults = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise Day2Error(f"cannot read the default of {name} ({exc}); set {name} in the inventory") from None
    if name not in defaults:
        raise Day2Error(f"{path} has no default for {name}; set {name} in the inventory")
    return defaults[name]


def as_int(host: str, key: str, value: Any) -> int:
    value = plain(host, key, value)
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
    address = plain(name, "ansible_host", v.get("ansible_host") or v.get("ansible_ssh_host") or name)
    ssh = parse_ssh_args(
        name,
        str(plain(name, "ansible_ssh_common_args", v.get("ansible_ssh_common_args") or "")),
        str(plain(name, "ansible_ssh_extra_args", v.get("ansible_ssh_extra_args") or "")),
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
    port = as_int(name, "ansible_port", port_value) if port_value is not None else 22
    user = (
        plain(name, "ansible_user", v.get("ansible_user") or v.get("ansible_ssh_user")) or getpass.getuser()
    )
    key = v.get("ansible_ssh_private_key_file") or v.get("ansible_private_key_file")
    if not key and "-i" in ssh:
        key = ssh["-i"][0]
    key_file = Path(plain(name, "ansible_ssh_private_key_file", key)).expanduser() if key else None
    known: list[Path] = []
    for files in ssh.get("userknownhostsfile", []):
        known.extend(Path(f).expanduser() for f in files.split() if f.lower() != "none")
    accelerator = plain(name, "sdnode_accelerator", v.get("sdnode_accelerator"))
    if accelerator is not None and accelerator not in ACCELERATORS:
        raise Day2Error(
            f"host {name}: sdnode_accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}"
        )
    return Node(
        name=name,
        address=str(address),
        port=port,
        user=str(user),
        key_file=key_file,
        known_hosts=tuple(known),
        become=_as_bool(plain(name, "ansible_become", v.get("ansible_become", False))),
        accelerator=accelerator,
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
    fleet = bool(group_members(listing, GATEWAY_GROUP))
    nodes = [
        dataclasses.replace(node_from_vars(name, hostvars.get(name) or {}), fleet=fleet)
        for name in sorted(group_members(listing, group))
    ]
    for node in nodes:
        # No default: the roles would take a missing one as cpu, validate.yml refuses it; so does sdnode.
        if node.accelerator is None:
            raise Day2Error(f"host {node.name}: sdnode_accelerator is not set; declare nvidia or cpu for it")
    return nodes


def inventory_error(stderr: str, rc: int) -> str:
    """The telling line of ansible-inventory's stderr: the first parse failure and where, else the last."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    origin = next((ln for ln in lines if ln.startswith("Origin:")), "")
    for line in lines:
        if "Failed to parse" in line or "Unable to parse" in line:
            message = re.sub(r"^\[(WARNING|ERROR)\]:\s*", "", line)
            return f"{message} ({origin})" if origin else message
    return re.sub(r"^\[(WARNING|ERROR)\]:\s*", "", lines[-1]) if lines else f"rc={rc}"


def ansible_env(**extra: str) -> dict[str, str]:
    """The environment Ansible's own commands get here: the repository's ansible.cfg, and a source no
    plugin can parse is an error, not an empty inventory with a warning."""
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="1", **extra)
    root = find_repo_root()
    if "ANSIBLE_CONFIG" not in env and root is not None and (root / "ansible.cfg").exists():
        env["ANSIBLE_CONFIG"] = str(root / "ansible.cfg")
    return env


def rendered_var(inventory: str, host: str, name: str) -> Any:
    """A host variable as a play would see it: templates resolved and inline !vault values decrypted
    (with the vault password Ansible is configured with). `ansible -m debug` runs on the controller
    and connects to nothing."""
    argv = [venv_tool("ansible"), host, "-i", inventory, "-m", "ansible.builtin.debug", "-a", f"var={name}"]
    # JSON alone on stdout: profile_tasks (ansible.cfg) is a stdout callback too, so keep only json.
    env = ansible_env(ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    env["ANSIBLE_CALLBACKS_ENABLED"] = "ansible.builtin.json"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        result = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"][host]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as exc:
        detail = (proc.stderr.strip().splitlines() or [""])[-1] if "proc" in locals() else str(exc)
        raise Day2Error(f"host {host}: cannot render {name} with ansible ({detail or exc})") from None
    value = result.get(name)
    if result.get("failed") or (isinstance(value, str) and value.startswith("VARIABLE IS NOT DEFINED")):
        raise Day2Error(f"host {host}: cannot render {name}: {result.get('msg') or value}")
    return value


def ansible_inventory_list(inventory: str, limit: str | None = None) -> dict[str, Any]:
    """The `ansible-inventory --list` JSON of `inventory` (ansible-inventory from this interpreter's venv)."""
    if "," not in inventory and not Path(inventory).exists():
        raise Day2Error(f"inventory {inventory!r} not found; {MAKE_ONE}")
    argv = [venv_tool("ansible-inventory"), "-i", inventory, "--list"]
    if limit:
        argv += ["--limit", limit]
    env = ansible_env()
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


def no_hosts(inventory: str, limit: str | None, group: str) -> Day2Error:
    where = f" matching --limit {limit!r}" if limit else ""
    hint = "" if limit else f"; {MAKE_ONE}"
    return Day2Error(f"no host in group {group}{where} in inventory {inventory}{hint}")


def host_names(inventory: str, limit: str | None = None, group: str = GROUP) -> list[str]:
    """The names of `group`'s hosts in `inventory`, narrowed by `--limit`; at least one."""
    names = sorted(group_members(ansible_inventory_list(inventory, limit), group))
    if not names:
        raise no_hosts(inventory, limit, group)
    return names


def load_nodes(inventory: str, limit: str | None = None, group: str = GROUP) -> list[Node]:
    """The nodes of `group` in `inventory`, narrowed by an Ansible `--limit` pattern; at least one."""
    listing = ansible_inventory_list(inventory)
    nodes = [dataclasses.replace(node, inventory=inventory) for node in nodes_from_listing(listing, group)]
    if limit:
        # Narrowed by Ansible's own pattern rules; the whole listing still tells whether there are gateways.
        picked = group_members(ansible_inventory_list(inventory, limit), group)
        nodes = [node for node in nodes if node.name in picked]
    if not nodes:
        raise no_hosts(inventory, limit, group)
    return nodes


def load_fleet(inventory: str, limit: str | None = None) -> tuple[list[Node], list[Node]]:
    """The serving nodes (narrowed by `--limit`, at least one) and the gateways (possibly none). The
    gateways are never narrowed: `--limit` picks serving nodes, and their view is at every gateway."""
    listing = ansible_inventory_list(inventory)
    hostvars = (listing.get("_meta") or {}).get("hostvars") or {}
    gateways = [
        dataclasses.replace(node_from_vars(name, hostvars.get(name) or {}), inventory=inventory)
        for name in sorted(group_members(listing, GATEWAY_GROUP))
    ]
    if limit:
        return load_nodes(inventory, limit), gateways
    nodes = [dataclasses.replace(node, inventory=inventory) for node in nodes_from_listing(listing)]
    if not nodes:
        raise no_hosts(inventory, limit, GROUP)
    return nodes, gateways


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
