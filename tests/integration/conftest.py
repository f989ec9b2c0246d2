"""Throwaway-node harness: the Molecule sequence (converge -> idempotence -> verify) driven from pytest.

Nodes come from `testnode` (systemd-nspawn, Debian 12). Every node a test asks for is torn down at the
end of the session, pass or fail, unless SDNODE_KEEP_NODES=1 (for poking at a failure by hand).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from sdnode.localinv import build_inventory, venv_tool

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("SDNODE_STATE_DIR", REPO / ".sdnode"))
LOCAL_GROUP_VARS = REPO / "inventory.local" / "group_vars"
LOGS = STATE / "logs"

RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)",
    re.MULTILINE,
)


tool = venv_tool


@dataclass
class PlaybookRun:
    """One ansible-playbook run: its exit code, full output, and the PLAY RECAP per host."""

    argv: list[str]
    rc: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    def total(self, key: str) -> int:
        return sum(counts[key] for counts in self.recap.values())

    @property
    def changed(self) -> int:
        return self.total("changed")

    @property
    def failed(self) -> int:
        return self.total("failed") + self.total("unreachable")

    def changed_tasks(self) -> list[str]:
        """Names of the tasks that reported a change, to make an idempotence failure readable."""
        names, current = [], None
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                current = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed:") and current:
                names.append(current)
        return names

    def explain(self) -> str:
        tail = "\n".join(self.output.splitlines()[-120:])
        return f"$ {' '.join(self.argv)}\n(rc={self.rc}, {self.seconds:.0f}s)\n{tail}"


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap = {}
    for m in RECAP.finditer(output):
        recap[m["host"]] = {k: int(v) for k, v in m.groupdict().items() if k != "host"}
    return recap


def ansible_playbook(
    playbook: str,
    inventory: Path,
    *,
    extra_vars: dict | None = None,
    limit: str | None = None,
    check: bool = False,
    diff: bool = False,
    tags: str | None = None,
    label: str | None = None,
    timeout: int = 1800,
    strategy: str | None = None,
) -> PlaybookRun:
    """ansible-playbook with the harness's usual options; `strategy` overrides ansible.cfg's."""
    argv = [tool("ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / playbook)]
    if limit:
        argv += ["--limit", limit]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    if tags:
        argv += ["--tags", tags]
    for key, value in (extra_vars or {}).items():
        argv += ["-e", yaml.safe_dump({key: value}, default_flow_style=True).strip()]
    return _recorded(argv, label or Path(playbook).stem, timeout, strategy)


def make_target(
    target: str,
    inventory: Path,
    *,
    label: str | None = None,
    timeout: int = 1800,
    strategy: str | None = None,
) -> PlaybookRun:
    """`make TARGET INVENTORY=...` exactly as the README shows it, parsed like a playbook run."""
    argv = ["make", "--no-print-directory", target, f"INVENTORY={inventory}"]
    return _recorded(argv, label or f"make-{target}", timeout, strategy)


def _recorded(argv: list[str], name: str, timeout: int, strategy: str | None = None) -> PlaybookRun:
    """Run from the repo root with the repo's ansible.cfg; keep the log under .sdnode/logs."""
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_FORCE_COLOR="0",
        SDNODE_STATE_DIR=str(STATE),
    )
    if strategy:
        env["ANSIBLE_STRATEGY"] = strategy
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    run = PlaybookRun(argv, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)
    run.recap = parse_recap(proc.stdout)
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{name}-{int(time.time())}.log").write_text(run.explain() + "\n\n" + run.output)
    print(f"[harness] {name}: rc={run.rc} changed={run.changed} failed={run.failed} in {run.seconds:.0f}s")
    return run


def assert_pytest_passes(argv: list[str]) -> str:
    """A pytest run (the testinfra suite, directly or through make) from the repo root passes; its output."""
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def sdnode(*args: str, state: Path = STATE, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """The day-2 command line, as an operator runs it, with the given controller state."""
    env = dict(os.environ, SDNODE_STATE_DIR=str(state))
    env.pop("SDNODE_INVENTORY", None)
    return subprocess.run([tool("sdnode"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    command = " ".join(proc.args)
    return (
        f"$ {command}\nrc={proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )


def verify(inventory: Path) -> str:
    """`make verify` as the README shows it: the testinfra suite against the inventory; its output."""
    return assert_pytest_passes(["make", "verify", f"INVENTORY={inventory}"])


def assert_converged(run: PlaybookRun) -> None:
    assert run.rc == 0 and run.failed == 0 and run.recap, run.explain()


def assert_idempotent(run: PlaybookRun) -> None:
    assert_converged(run)
    assert run.changed == 0, f"not idempotent, changed: {run.changed_tasks()}\n{run.explain()}"


class TestNodes:
    """Session-wide owner of throwaway nodes: brings them up on demand and always takes them down."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def up(self, name: str, *flags: str) -> None:
        if name not in self.started:
            self.started.append(name)  # recorded first, so a half-started node is cleaned up too
        subprocess.run([tool("testnode"), "up", name, *flags], check=True, timeout=900)

    def ssh(self, name: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [tool("testnode"), "ssh", name, command], capture_output=True, text=True, check=check, timeout=300
        )

    def inventory(self, path: Path, nodes: list[str], host_vars: dict[str, dict] | None = None) -> Path:
        """An inventory dir holding only `nodes`, with the local group_vars and optional host_vars."""
        return build_inventory(path, nodes, LOCAL_GROUP_VARS, host_vars)

    def down(self, name: str) -> None:
        subprocess.run([tool("testnode"), "down", name], check=True, timeout=300)

    def down_all(self) -> None:
        for name in reversed(self.started):
            subprocess.run([tool("testnode"), "down", name], check=False, timeout=300)


@pytest.fixture(scope="session")
def testnodes() -> Iterator[TestNodes]:
    if os.geteuid() != 0:
        pytest.fail("the integration suite boots systemd-nspawn nodes and must run as root")
    nodes = TestNodes()
    try:
        yield nodes
    finally:
        if os.environ.get("SDNODE_KEEP_NODES") != "1":
            nodes.down_all()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random pipeline every test deploys (built once on the controller, as the demo does)."""
    target = STATE / "models" / "tiny"
    if not (target / "model_index.json").exists():
        subprocess.run([tool("sdserve"), "make-tiny-model", str(target)], check=True, timeout=300)
    return target


@dataclass
class Deployment:
    """A node taken from fresh to serving by site.yml, with the runs that got it there."""

    node: str
    inventory: Path
    converge: PlaybookRun
    idempotence: PlaybookRun


SERVING_NODE = "sn1"


@pytest.fixture(scope="session")
def deployed(testnodes: TestNodes, tiny_model: Path) -> Deployment:
    """Converge then idempotence of site.yml on one fresh node, in that order, before anything else
    touches it; tests that change the node (rollback, kill -9) come after and put it back."""
    testnodes.up(SERVING_NODE)
    inventory = testnodes.inventory(STATE / "ci" / "serving", [SERVING_NODE])
    converge = ansible_playbook("site.yml", inventory, label="site-converge")
    assert_converged(converge)
    # The second run goes through `make deploy`, the README's command for it.
    idempotence = make_target("deploy", inventory, label="site-idempotence")
    return Deployment(SERVING_NODE, inventory, converge, idempotence)
