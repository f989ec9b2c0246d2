"""Node records, host-wide: one per node under /var/lib/sdnode/testnodes/<name>/, whichever checkout
started it, and the host lock that serialises every `testnode` process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from sdnode.testnode.fileops import file_lock, write_file
from sdnode.testnode.images import DEFAULT_OS
from sdnode.testnode.processes import TestnodeError, proc_alive

NODES_ENV = "SDNODE_NODES_DIR"
DEFAULT_NODES_DIR = Path("/var/lib/sdnode/testnodes")


@dataclasses.dataclass
class NodeRecord:
    name: str
    address: str
    state_dir: str
    status: str = "creating"  # creating -> up
    password_login: bool = False
    memory: int | None = None
    owner_pid: int | None = None  # the `up` process, while creating
    owner_start: int | None = None
    supervisor_pid: int | None = None
    supervisor_start: int | None = None
    cgroup: str | None = None  # memory cgroup made for --memory
    os_name: str = DEFAULT_OS  # a key of OS_IMAGES
    created: float = dataclasses.field(default_factory=time.time)

    def is_live(self) -> bool:
        """Running (its supervisor lives) or being created by a live `up`."""
        if proc_alive(self.supervisor_pid, self.supervisor_start):
            return True
        return self.status == "creating" and proc_alive(self.owner_pid, self.owner_start)

    def is_running(self) -> bool:
        return self.status == "up" and proc_alive(self.supervisor_pid, self.supervisor_start)


def nodes_dir() -> Path:
    override = os.environ.get(NODES_ENV)
    return Path(override) if override else DEFAULT_NODES_DIR


def host_lock() -> contextlib.AbstractContextManager[None]:
    """Serialises allocation and shared network set-up/tear-down among all `testnode` processes."""
    return file_lock(nodes_dir() / ".lock")


def node_dir(name: str) -> Path:
    return nodes_dir() / name


def record_path(name: str) -> Path:
    return node_dir(name) / "node.json"


def load_record(name: str) -> NodeRecord | None:
    try:
        data = json.loads(record_path(name).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError) as exc:
        raise TestnodeError(
            f"node record {record_path(name)} is unreadable ({exc}); run `testnode gc`"
        ) from exc
    known = {f.name for f in dataclasses.fields(NodeRecord)}
    return NodeRecord(**{k: v for k, v in data.items() if k in known})


def save_record(record: NodeRecord) -> None:
    write_file(record_path(record.name), json.dumps(dataclasses.asdict(record), indent=2) + "\n")


def load_records() -> list[NodeRecord]:
    base = nodes_dir()
    if not base.is_dir():
        return []
    records = []
    for path in sorted(base.glob("*/node.json")):
        with contextlib.suppress(TestnodeError):
            record = load_record(path.parent.name)
            if record is not None:
                records.append(record)
    return records


def node_status(record: NodeRecord) -> str:
    if record.is_running():
        return "running"
    return "creating" if record.is_live() else "dead"
