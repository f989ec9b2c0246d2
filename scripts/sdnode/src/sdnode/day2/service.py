"""What a node serves and how it is doing: instances, API key, readiness, figures, manifest."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdnode.day2 import Day2Error
from sdnode.day2.inventory import Node
from sdnode.day2.metrics import parse_figures
from sdnode.day2.remote import HTTPResult, NodeSession

MANIFEST = "/etc/sdserve/manifest.json"
KEY_FILE = "/etc/sdserve/api-keys"
UNIT_RE = re.compile(r"^sdserve@(\d+)\.service$")
WILDCARD_LISTEN = ("0.0.0.0", "::", "127.0.0.1", "localhost")


def probe_host(node: Node) -> str:
    """Where on the node to reach the service: loopback unless it listens on one specific other address."""
    address = str(node.vars.get("sd_service_listen_address", "127.0.0.1"))
    return "127.0.0.1" if address in WILDCARD_LISTEN or "{{" in address else address


def api_key_files(state: Path, node: Node) -> list[Path]:
    """The deploy's generated keys for `node`: $STATE/api-keys/<inventory_hostname>.<name>.key, sorted."""
    return sorted((state / "api-keys").glob(f"{node.name}.*.key"))


def api_token(state: Path, node: Node) -> str | None:
    files = api_key_files(state, node)
    if not files:
        return None
    try:
        return files[0].read_text().strip() or None
    except OSError as exc:
        raise Day2Error(f"{node.name}: cannot read API key {files[0]}: {exc.strerror}") from None


def need_token(state: Path, node: Node) -> str:
    token = api_token(state, node)
    if token is None:
        raise Day2Error(
            f"{node.name}: no API key in {state / 'api-keys'}/{node.name}.<name>.key (the deploy writes it; "
            f"with keys from sd_service_api_keys, copy one there, mode 0600)"
        )
    return token


def parse_units(text: str) -> list[int]:
    """Instance numbers from `systemctl list-units --plain --no-legend` lines."""
    found = set()
    for line in text.splitlines():
        words = line.split()
        if words:
            m = UNIT_RE.match(words[0].lstrip("●* "))
            if m:
                found.add(int(m.group(1)))
    return sorted(found)


def parse_driver(text: str) -> tuple[str, int]:
    """(driver version, GPU count) from `nvidia-smi --query-gpu=driver_version --format=csv,noheader`."""
    versions = [line.strip() for line in text.splitlines() if line.strip()]
    if not versions:
        return "-", 0
    return ",".join(sorted(set(versions))), len(versions)


@dataclass
class Discovery:
    """What runs on a node: driver, GPU count and instance numbers."""

    driver: str
    gpus: int | None
    instances: list[int]


def discover(session: NodeSession) -> Discovery:
    """Instance numbers: the sdserve@N units systemd knows, together with those the node should run
    (0 on cpu nodes; sd_service_gpu_indexes or one per GPU on nvidia nodes), so a missing one shows up."""
    node = session.node
    _, units_out, _ = session.run(
        "systemctl list-units --all --plain --no-legend --no-pager 'sdserve@*' 2>/dev/null"
    )
    listed = parse_units(units_out)
    if node.accelerator == "cpu":
        return Discovery("-", None, sorted(set(listed) | {0}))
    rc, out, err = session.run("nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    if rc != 0:
        detail = (err or out).strip().splitlines()
        raise Day2Error(f"{node.name}: nvidia-smi failed: {detail[-1] if detail else 'rc=' + str(rc)}")
    driver, gpus = parse_driver(out)
    wanted = node.vars.get("sd_service_gpu_indexes") or list(range(gpus))
    try:
        expected = {int(i) for i in wanted}
    except (TypeError, ValueError):
        expected = set()
    return Discovery(driver, gpus, sorted(set(listed) | expected))


def read_manifest(session: NodeSession) -> dict[str, Any]:
    rc, out, err = session.run(f"cat {MANIFEST}", sudo=True)
    if rc != 0:
        node = session.node
        hint = "; set ansible_become: true for this host" if node.user != "root" and not node.become else ""
        detail = (err or out).strip() or f"rc={rc}"
        raise Day2Error(f"{node.name}: cannot read {MANIFEST}: {detail}{hint}")
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise Day2Error(f"{session.node.name}: {MANIFEST} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Day2Error(f"{session.node.name}: {MANIFEST} is not a JSON object")
    return data


def model_label(manifest: dict[str, Any] | None) -> str:
    model = (manifest or {}).get("model") or {}
    if not isinstance(model, dict) or not (model.get("id") or model.get("revision")):
        return "-"
    return f"{model.get('id') or '?'}@{model.get('revision') or '?'}"


@dataclass
class InstanceStatus:
    instance: int
    port: int
    service: str = "-"
    ready: str = "-"  # yes / no / the error
    queue_depth: float | None = None
    images: float | None = None
    model: str = "-"
    keys: str = "-"  # API keys in force, or "stale" when the last reload refused the key file
    note: str = ""  # why a figure is missing, or what needs doing

    @property
    def healthy(self) -> bool:
        return self.service == "active" and self.ready == "yes" and self.keys != "stale"


@dataclass
class NodeStatus:
    node: str
    address: str
    reachable: bool
    error: str = ""
    accelerator: str = ""
    driver: str = "-"
    gpus: int | None = None
    instances: list[InstanceStatus] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.reachable and bool(self.instances) and all(i.healthy for i in self.instances)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["healthy"] = self.healthy
        for item, inst in zip(data["instances"], self.instances, strict=True):
            item["healthy"] = inst.healthy
        return data


def readyz_state(answer: HTTPResult) -> str:
    """The engine state a 503 from /readyz names (loading, warming, failed...), else the HTTP status."""
    try:
        state = answer.json().get("status")
    except (ValueError, AttributeError):
        state = None
    return state if isinstance(state, str) and state else f"HTTP {answer.status}"


def instance_status(session: NodeSession, instance: int, token: str | None, model: str) -> InstanceStatus:
    node = session.node
    port = node.service_port(instance)
    status = InstanceStatus(instance, port, model=model)
    _, out, _ = session.run(f"systemctl is-active {shlex.quote(f'sdserve@{instance}')}")
    status.service = out.strip() or "unknown"
    host = probe_host(node)
    try:
        ready = session.http("GET", port, "/readyz", timeout=15, host=host)
        status.ready = "yes" if ready.status == 200 else f"no ({readyz_state(ready)})"
    except Day2Error as exc:
        status.ready = "down" if "cannot connect" in str(exc) else "error"
        return status
    try:
        metrics = session.http("GET", port, "/metrics", token=token, timeout=15, host=host)
        if metrics.status == 200:
            figures = parse_figures(metrics.text)
            status.queue_depth, status.images = figures.queue_depth, figures.images
            if figures.keys is not None:
                status.keys = str(int(figures.keys))
            if figures.keys_stale:
                status.keys = "stale"
                status.note = (
                    f"the last key reload refused {KEY_FILE} (emptied or malformed); the previous "
                    f"{int(figures.keys or 0)} keys stay in force. Fix the file and reload "
                    "(`sdnode logs` says why)"
                )
        elif metrics.status in (401, 403):
            status.note = f"/metrics refused the API key ({'none found' if token is None else 'rejected'})"
        else:
            status.note = f"/metrics answered HTTP {metrics.status}"
    except Day2Error as exc:
        status.note = str(exc).removeprefix(f"{node.name}: ")
    except ValueError as exc:
        status.note = f"/metrics is not Prometheus text: {exc}"
    if status.model == "-" and token is not None:
        # No readable manifest: the model id the service itself reports.
        try:
            models = session.http("GET", port, "/v1/models", token=token, timeout=15, host=host)
            status.model = models.json()["data"][0]["id"] if models.status == 200 else "-"
        except (Day2Error, ValueError, KeyError, IndexError, TypeError):
            pass
    return status


def node_status(node: Node, state: Path) -> NodeStatus:
    result = NodeStatus(node.name, node.address, reachable=False, accelerator=node.accelerator)
    try:
        session = NodeSession(node).open()
    except Day2Error as exc:
        result.error = str(exc).removeprefix(f"{node.name}: ")
        return result
    with session:
        result.reachable = True
        try:
            found = discover(session)
            result.driver, result.gpus = found.driver, found.gpus
            try:
                model = model_label(read_manifest(session))
            except Day2Error:
                model = "-"
            token = api_token(state, node)
            result.instances = [instance_status(session, n, token, model) for n in found.instances]
        except Day2Error as exc:
            result.error = str(exc).removeprefix(f"{node.name}: ")
    return result
