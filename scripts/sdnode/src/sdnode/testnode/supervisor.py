"""The per-node supervisor: keeps systemd-nspawn running across reboots (status 133) and stops on
anything else; its memory cgroup; and telling a node's supervisor and nspawn processes apart."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdnode.testnode.checkout import log_path
from sdnode.testnode.names import NETNS_PREFIX, netns_name
from sdnode.testnode.noderoot import rootfs_path
from sdnode.testnode.processes import TestnodeError, all_pids, proc_cmdline, proc_environ, proc_start_time
from sdnode.testnode.records import NodeRecord

NSPAWN_REBOOT_STATUS = 133
NSPAWN_PROPAGATE = Path("/run/systemd/nspawn/propagate")
NSPAWN_NETNS_ARG = "--network-namespace-path=/run/netns/"
# The marker of a supervisor: set (to the node's name) in its environment and nowhere else. gc and down
# find supervisors by it alone, so neither a module's path nor a look-alike command line can mislead them.
SUPERVISOR_ENV = "SDNODE_TESTNODE_SUPERVISOR"
CGROUP_PREFIX = "sdnode-"  # a node's memory cgroup: sdnode-<name>


def nspawn_argv(name: str) -> list[str]:
    return [
        "systemd-nspawn",
        "--register=no",
        "--keep-unit",
        f"{NSPAWN_NETNS_ARG}{netns_name(name)}",
        "-b",
        "-D",
        str(rootfs_path(name)),
        f"--machine={name}",
        # a private netns already implies CAP_NET_ADMIN; explicit so the node's nftables is testable
        "--capability=CAP_NET_ADMIN",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--console=read-only",
    ]


def nspawn_env() -> dict[str, str]:
    # /proc/sys/net writable (the node's own netns), so sysctl for net.* works like on a VM; the rest of
    # /proc/sys stays read-only: it is the host's kernel. The supervisor's marker stays with the supervisor.
    env = {key: value for key, value in os.environ.items() if key != SUPERVISOR_ENV}
    return {**env, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}


def memory_cgroup(name: str) -> Path | None:
    """A cgroup (v1 memory controller or v2) below our own, for --memory; None if none is usable."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            mount = Path("/sys/fs/cgroup/memory")
            if mount.is_dir():
                return mount / path.lstrip("/") / f"{CGROUP_PREFIX}{name}"
    unified = Path("/sys/fs/cgroup/cgroup.controllers")
    if unified.exists() and "memory" in unified.read_text().split():
        own = next(
            line.split("::", 1)[1]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        return Path("/sys/fs/cgroup") / own.lstrip("/") / f"{CGROUP_PREFIX}{name}"
    return None


def limit_memory(name: str, limit: int) -> None:
    group = memory_cgroup(name)
    if group is None:
        raise TestnodeError("--memory: no memory cgroup controller on this host")
    group.mkdir(exist_ok=True)
    v1 = (group / "memory.limit_in_bytes").exists()
    (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
    (group / "cgroup.procs").write_text(str(os.getpid()))


def remove_cgroup(group: Path) -> None:
    # Just-killed tasks may linger a moment in the group (rmdir: EBUSY).
    for _ in range(20):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    print(f"testnode: warning: could not remove cgroup {group}", file=sys.stderr)


def supervise(name: str, argv: list[str], memory: int | None) -> int:
    if memory:
        limit_memory(name, memory)
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # nspawn halts the container in an orderly way

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    while True:
        print(f"supervisor: starting {shlex.join(argv)}", flush=True)
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=nspawn_env())
        status = child.wait()
        print(f"supervisor: systemd-nspawn exited with status {status}", flush=True)
        if status != NSPAWN_REBOOT_STATUS or stopping:
            return 0 if stopping else status
        print("supervisor: node rebooted, starting it again", flush=True)


def start_supervisor(record: NodeRecord, base: Path) -> None:
    # `python -m` the command line of this package, wherever it lives; the marker names the node.
    argv = [sys.executable, "-m", f"{__package__}.cli", "_supervise", record.name, str(record.memory or 0)]
    with open(log_path(base, record.name), "ab") as out:
        proc = subprocess.Popen(
            [*argv, "--", *nspawn_argv(record.name)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, SUPERVISOR_ENV: record.name},
        )
    record.supervisor_pid = proc.pid
    record.supervisor_start = proc_start_time(proc.pid)


def node_of_pid(pid: int) -> str | None:
    """The node whose supervisor (by its marker) or systemd-nspawn (by its namespace) `pid` is, else None."""
    supervised = proc_environ(pid).get(SUPERVISOR_ENV)
    if supervised:
        return supervised
    argv = proc_cmdline(pid)
    if argv and argv[0].endswith("systemd-nspawn"):
        for arg in argv:
            if arg.startswith(f"{NSPAWN_NETNS_ARG}{NETNS_PREFIX}"):
                return arg.removeprefix(f"{NSPAWN_NETNS_ARG}{NETNS_PREFIX}")
    return None


def node_processes() -> dict[int, str]:
    """Every node's supervisor and nspawn processes (other than this one) -> the node's name."""
    found = {}
    for pid in all_pids():
        node = node_of_pid(pid)
        if node is not None and pid != os.getpid():
            found[pid] = node
    return found


def stray_pids(names: set[str]) -> list[int]:
    """Supervisor and nspawn processes of the given nodes."""
    return [pid for pid, node in node_processes().items() if node in names]
