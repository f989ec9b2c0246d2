"""Bringing nodes up and down: claiming a name and address, preparing and booting, waiting for SSH, and
removing everything a node made."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from sdnode.state import state_dir
from sdnode.testnode.checkout import (
    ensure_key,
    known_hosts_path,
    log_tail,
    password_path,
    ssh_base_args,
    state_lock,
    testnodes_state,
    update_known_hosts,
)
from sdnode.testnode.fileops import write_file
from sdnode.testnode.hostsetup import require_host_tools
from sdnode.testnode.images import DEFAULT_OS, OS_IMAGES
from sdnode.testnode.inventory import write_inventory
from sdnode.testnode.names import allocate_address, netns_name, validate_name
from sdnode.testnode.network import (
    netns_list,
    netns_pids,
    remove_node_network,
    setup_node_network,
    setup_shared_network,
    teardown_shared_network,
)
from sdnode.testnode.noderoot import discard_tree, prepare_rootfs, rootfs_path, unmount_node
from sdnode.testnode.processes import (
    Log,
    TestnodeError,
    kill_quietly,
    pids_rooted_at,
    proc_alive,
    proc_start_time,
    require_root,
    run,
    wait_gone,
)
from sdnode.testnode.records import (
    NodeRecord,
    host_lock,
    load_record,
    load_records,
    node_dir,
    node_status,
    save_record,
)
from sdnode.testnode.rootfs import ensure_rootfs_tarball
from sdnode.testnode.supervisor import (
    NSPAWN_PROPAGATE,
    memory_cgroup,
    remove_cgroup,
    start_supervisor,
    stray_pids,
)

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def wait_ready(record: NodeRecord, base: Path, timeout: float = READY_TIMEOUT_S) -> str:
    """Wait until systemd reports the boot finished (running or degraded) and SSH answers."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc_alive(record.supervisor_pid, record.supervisor_start):
            raise TestnodeError(
                f"node {record.name} stopped while booting; log tail:\n{log_tail(base, record.name)}"
            )
        result = run(
            [
                *ssh_base_args(base, record.address, connect_timeout=2),
                "systemctl",
                "is-system-running",
                "--wait",
            ],
            check=False,
            timeout=max(5.0, deadline - time.monotonic()),
        )
        state = result.stdout.strip()
        if state in ("running", "degraded"):
            return state
        last = state or result.stderr.strip()
        time.sleep(0.3)
    raise TestnodeError(
        f"node {record.name} not ready after {timeout:.0f} s (last: {last}); log tail:\n"
        f"{log_tail(base, record.name)}"
    )


def up(
    name: str,
    *,
    password_login: bool = False,
    memory: int | None = None,
    os_name: str = DEFAULT_OS,
    log: Log = print,
) -> NodeRecord:
    validate_name(name)
    if os_name not in OS_IMAGES:
        raise TestnodeError(f"--os {os_name!r}: choose one of {', '.join(OS_IMAGES)}")
    require_root("up")
    require_host_tools()
    base = state_dir()
    tarball = ensure_rootfs_tarball(OS_IMAGES[os_name], log)
    try:
        record = _claim(name, base, password_login, memory, os_name)
        if record.status == "up":
            log(f"{name} is already up at {record.address}")
            write_inventory(base)
            return record
        started = time.monotonic()
        with host_lock():
            ensure_key(base)
            setup_shared_network()
            setup_node_network(name, record.address)
        password = secrets.token_urlsafe(18) if password_login else None
        host_keys = prepare_rootfs(name, record.address, tarball, base, password)
        pw_file = password_path(base, name)
        if password is not None:
            write_file(pw_file, password + "\n", 0o600)
        else:
            pw_file.unlink(missing_ok=True)
        with state_lock(base):
            update_known_hosts(known_hosts_path(base), record.address, host_keys)
        prepared = time.monotonic() - started
        start_supervisor(record, base)
        save_record(record)
        state = wait_ready(record, base)
        record.status = "up"
        record.owner_pid = record.owner_start = None
        save_record(record)
        write_inventory(base)
        total = time.monotonic() - started
        log(
            f"{name} is up at {record.address} (systemd {state}; {total:.1f} s: {prepared:.1f} s to prepare, "
            f"{total - prepared:.1f} s to boot)"
        )
        return record
    except BaseException:
        # Interrupted or failed half-way: leave nothing behind (down takes the host lock itself), but
        # only if this process made the node: never someone else's running one.
        with contextlib.suppress(Exception):
            mine = load_record(name)
            if mine is not None and mine.status == "creating" and mine.owner_pid == os.getpid():
                down(name, log=lambda _msg: None)
        raise


def _claim(name: str, base: Path, password_login: bool, memory: int | None, os_name: str) -> NodeRecord:
    """The node's record: the running one, or a new one with the lowest free address (status creating)."""
    with host_lock():
        existing = load_record(name)
        if existing is not None and existing.is_live():
            if existing.state_dir != str(base):
                raise TestnodeError(
                    f"node {name} exists and belongs to {existing.state_dir}; pick another "
                    "name or `testnode down` it from there"
                )
            if existing.status == "up" and existing.os_name != os_name:
                raise TestnodeError(
                    f"node {name} runs {existing.os_name}, not {os_name}; `testnode down {name}` first"
                )
            if existing.status == "up":
                return existing
            raise TestnodeError(f"node {name} is being created by process {existing.owner_pid}")
        if existing is not None:  # a dead leftover: clear it, then start afresh
            remove_node_resources(existing.name, existing.address, existing.cgroup)
        used = [r.address for r in load_records() if r.name != name and r.is_live()]
        record = NodeRecord(
            name=name,
            address=allocate_address(used),
            state_dir=str(base),
            password_login=password_login,
            memory=memory,
            os_name=os_name,
            owner_pid=os.getpid(),
            owner_start=proc_start_time(os.getpid()),
        )
        if memory:
            group = memory_cgroup(name)
            if group is None:
                raise TestnodeError("--memory: no memory cgroup controller on this host")
            record.cgroup = str(group)
        # From here on the address is taken, and a concurrent down or gc keeps the shared network.
        save_record(record)
    return record


def stop_processes(record: NodeRecord) -> None:
    """Halt the node (SIGTERM to the supervisor, which nspawn turns into an orderly halt), then force."""
    if proc_alive(record.supervisor_pid, record.supervisor_start):
        assert record.supervisor_pid is not None
        kill_quietly(record.supervisor_pid, signal.SIGTERM)
        if wait_gone([record.supervisor_pid], STOP_TIMEOUT_S):
            return
    kill_node_processes(record.name)


def kill_node_processes(name: str) -> None:
    """SIGKILL a node's supervisor, nspawn and everything inside it; the container's init outlives a
    killed nspawn, so processes are found by their root directory and network namespace too."""
    pids = set(stray_pids({name})) | set(pids_rooted_at([rootfs_path(name)]))
    if netns_name(name) in netns_list():
        pids |= set(netns_pids(netns_name(name)))
    pids.discard(os.getpid())
    for pid in pids:
        kill_quietly(pid)
    wait_gone(pids, 5)


def remove_node_resources(name: str, address: str | None, cgroup: str | None = None) -> None:
    kill_node_processes(name)
    unmount_node(name)
    remove_node_network(name, address)
    # nspawn leaves this (empty) behind when /run is not a tmpfs, as on these machines.
    with contextlib.suppress(OSError):
        (NSPAWN_PROPAGATE / name).rmdir()
    if node_dir(name).exists():
        discard_tree(node_dir(name))
    if cgroup:
        remove_cgroup(Path(cgroup))


def down(name: str, *, log: Log = print) -> bool:
    """Stop a node and remove everything it made; True if there was a node. Idempotent."""
    validate_name(name)
    require_root("down")
    record = load_record(name)
    if record is None:
        with host_lock():
            remove_node_resources(name, None)
            _teardown_if_last()
        log(f"{name}: no such node")
        return False
    stop_processes(record)
    with host_lock():
        remove_node_resources(name, record.address, record.cgroup)
        _teardown_if_last()
    forget_in_state(record)
    log(f"{name} is down")
    return True


def forget_in_state(record: NodeRecord) -> None:
    """Drop a removed node from its checkout's known_hosts, passwords and inventory."""
    base = Path(record.state_dir)
    if not testnodes_state(base).is_dir():
        return
    with state_lock(base):
        update_known_hosts(known_hosts_path(base), record.address, [])
    password_path(base, record.name).unlink(missing_ok=True)
    write_inventory(base)


def _teardown_if_last() -> None:
    if not any(r.is_live() for r in load_records()):
        teardown_shared_network()


def list_nodes(base: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "address": r.address,
            "status": node_status(r),
            "password_login": r.password_login,
            "os": r.os_name,
            "state_dir": r.state_dir,
            "mine": r.state_dir == str(base),
        }
        for r in load_records()
    ]


def find_own_node(name: str, base: Path) -> NodeRecord:
    record = load_record(validate_name(name))
    if record is None or not record.is_running():
        raise TestnodeError(f"node {name} is not running; start it with `testnode up {name}`")
    if record.state_dir != str(base):
        raise TestnodeError(f"node {name} belongs to {record.state_dir}; set SDNODE_STATE_DIR to reach it")
    return record
