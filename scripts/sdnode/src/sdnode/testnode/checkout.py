"""One checkout's own files ($STATE/testnodes/): the key pair, known_hosts, passwords, node logs, and the
ssh command line that uses them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from sdnode.state import state_dir
from sdnode.testnode.fileops import file_lock, write_file
from sdnode.testnode.processes import run


def testnodes_state(base: Path | None = None) -> Path:
    return (base or state_dir()) / "testnodes"


def key_path(base: Path | None = None) -> Path:
    return testnodes_state(base) / "id_ed25519"


def known_hosts_path(base: Path | None = None) -> Path:
    return testnodes_state(base) / "known_hosts"


def default_inventory_path(base: Path | None = None) -> Path:
    return testnodes_state(base) / "inventory" / "hosts.yml"


def password_path(base: Path, name: str) -> Path:
    """Root's password, for a node started with --password-login."""
    return testnodes_state(base) / f"{name}.password"


def log_path(base: Path, name: str) -> Path:
    """The node's supervisor and console output."""
    return testnodes_state(base) / f"{name}.log"


def state_lock(base: Path | None = None) -> contextlib.AbstractContextManager[None]:
    return file_lock(testnodes_state(base) / ".lock")


def ensure_key(base: Path) -> Path:
    key = key_path(base)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(key.parent, 0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testnode", "-f", key])
    return key


def update_known_hosts(path: Path, address: str, host_keys: Sequence[str]) -> None:
    """Replace every line for `address` with the node's current host keys ("type base64" strings)."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split(" ", 1)[0] != address]
    kept.extend(f"{address} {key}" for key in host_keys)
    write_file(path, "".join(f"{line}\n" for line in kept), 0o644)


def ssh_base_args(
    base: Path, address: str, *, batch: bool = True, connect_timeout: int | None = None
) -> list[str]:
    args = [
        "ssh",
        "-i",
        str(key_path(base)),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts_path(base)}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    if batch:
        args += ["-o", "BatchMode=yes"]
    if connect_timeout is not None:
        args += ["-o", f"ConnectTimeout={connect_timeout}"]
    return [*args, f"root@{address}"]


def log_tail(base: Path, name: str, lines: int = 30) -> str:
    try:
        return "\n".join(log_path(base, name).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
