"""What every other module builds on: TestnodeError, running commands, and finding processes in /proc."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

Log = Callable[[str], object]  # where progress messages go


class TestnodeError(Exception):
    """A failure with a message meant for the user."""

    __test__ = False  # not a pytest test class


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; on failure raise TestnodeError naming the command and its stderr."""
    argv = [str(a) for a in cmd]
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError as exc:
        raise TestnodeError(f"{argv[0]} not found: run `testnode host-setup` as root") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestnodeError(f"`{shlex.join(argv)}` timed out after {timeout} s") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise TestnodeError(f"`{shlex.join(argv)}` failed with status {result.returncode}: {detail}")
    return result


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise TestnodeError(
            f"`testnode {what}` needs root (network namespaces, nftables, systemd-nspawn); "
            "run it with sudo or as root"
        )


def proc_start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot), or None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def proc_alive(pid: int | None, start: int | None) -> bool:
    """True when `pid` runs and is the same process as recorded (start time guards against pid reuse)."""
    if not pid:
        return False
    now = proc_start_time(pid)
    if now is None:
        return False
    if start is not None and now != start:
        return False
    # A zombie is as good as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _proc_strings(pid: int, name: str) -> list[str]:
    """The NUL-separated strings of /proc/PID/<name>; none for a process that is gone or not ours to read."""
    try:
        raw = Path(f"/proc/{pid}/{name}").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def proc_cmdline(pid: int) -> list[str]:
    return _proc_strings(pid, "cmdline")


def proc_environ(pid: int) -> dict[str, str]:
    """The environment the process started with."""
    return dict(item.split("=", 1) for item in _proc_strings(pid, "environ") if "=" in item)


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def pids_rooted_at(roots: Iterable[Path]) -> list[int]:
    """Processes whose root directory is one of `roots`: what runs inside a node, even after nspawn died."""
    wanted = set()
    for root in roots:
        with contextlib.suppress(OSError):
            st = root.stat()
            wanted.add((st.st_dev, st.st_ino))
    found = []
    for pid in all_pids() if wanted else []:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/root")
            if (st.st_dev, st.st_ino) in wanted:
                found.append(pid)
    return found


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until none of `pids` runs; True if they all went."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if proc_alive(p, None)}
        if pending:
            time.sleep(0.1)
    return not pending
