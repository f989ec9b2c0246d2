"""Files and trees on the host: atomic writes, locks, the mounts below a path, and removal."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sdnode.testnode.processes import run

# --one-file-system: never follow into a mount that something left inside a root filesystem.
RM_TREE = ("rm", "-rf", "--one-file-system")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, held for the duration of the block (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_file(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename) with the given mode, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def mount_points_under(path: Path) -> list[str]:
    """Mount points below `path`, deepest first (the order to unmount them in)."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(f"{path}/")), reverse=True)


def remove_tree(path: Path) -> None:
    run([*RM_TREE, path])
