"""What a node serves and how it is doing: instances, API key, readiness, figures, manifest."""

from __future__ import annotations

import functools
import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdnode.day2 import Day2Error
from sdnode.day2.inventory import Node, needs_rendering, plain, rendered_var, role_default
from sdnode.day2.metrics import parse_figures
from sdnode.day2.remote import HTTPResult, NodeSession

MANIFEST = "/etc/sdserve/manifest.json"
KEY_FILE = "/etc/sdserve/api-keys"
REDEPLOY = "deploy it again (make deploy) so that it records its instances"


def generated_key_path(state: Path, host: str, hostvars: Mapping[str, Any], fleet: bool = False) -> Path:
    """Where the deploy keeps the key it generated for the first name in sd_service_generated_keys: the
    node's own, or in a fleet behind gateways the fleet's (sd_service_keys_owner)."""
    names = plain(
        host,
        "sd_service_generated_keys",
        hostvars.get("sd_service_generated_keys", role_default("sd_service", "sd_service_generated_keys")),
    )
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise Day2Error(f"host {host}: sd_service_generated_keys must be a list of key names, got {names!r}")
    # sdnode_api_keys_dir (roles/sdnode/defaults/main.yml), where sd_service writes them.
    return state / "api-keys" / f"{'fleet' if fleet else host}.{names[0]}.key"


def api_key(
    state: Path,
    host: str,
    hostvars: Mapping[str, Any],
    render: Callable[[str], Any] | None = None,
    fleet: bool = False,
) -> str:
    """The API key sent to `host`'s instances, chosen as the deploy chose the keys it installed: the first of
    the inventory's sd_service_api_keys (Vault), else the key the deploy generated (generated_key_path).
    `render(name)` gives a variable as a play sees it, for keys written as templates or inline !vault."""
    given = hostvars.get("sd_service_api_keys")
    if render is not None and needs_rendering(given):
        given = render("sd_service_api_keys")
    given = plain(host, "sd_service_api_keys", given)
    if given:
        first = given[0] if isinstance(given, list) else None
        key = plain(host, "sd_service_api_keys", first.get("key") if isinstance(first, dict) else None)
        if not isinstance(key, str) or not key:
            raise Day2Error(f"host {host}: the first entry of sd_service_api_keys has no key")
        return key
    path = generated_key_path(state, host, hostvars, fleet)
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise Day2Error(f"{host}: cannot read API key {path}: {exc.strerror}") from None
    if not key:
        raise Day2Error(
            f"{host}: no API key: set sd_service_api_keys in the inventory, or deploy once (make deploy) "
            f"so that the key is generated at {path}"
        )
    return key


def node_api_key(state: Path, node: Node) -> str:
    """api_key for an inventory node, rendering a templated or inline-vault key through Ansible."""
    render = functools.partial(rendered_var, node.inventory, node.name) if node.inventory else None
    return api_key(state, node.name, node.vars, render, node.fleet)


def parse_driver(text: str) -> tuple[str, int]:
    """(driver version, GPU count) from `nvidia-smi --query-gpu=driver_version --format=csv,noheader`."""
    versions = [line.strip() for line in text.splitlines() if line.strip()]
    if not versions:
        return "-", 0
    return ",".join(sorted(set(versions))), len(versions)


def gpu_facts(session: NodeSession) -> tuple[str, int]:
    """(driver version, GPU count) of an nvidia node: node state shown by status, not where instances are."""
    rc, out, err = session.run("nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    if rc != 0:
        detail = (err or out).strip().splitlines()
        why = detail[-1] if detail else f"rc={rc}"
        raise Day2Error(f"{session.node.name}: nvidia-smi failed: {why}")
    return parse_driver(out)


@dataclass(frozen=True)
class Instance:
    """One sdserve instance as the node's manifest records it; `url` is how the node itself reaches it."""

    name: str  # the systemd unit, sdserve@N
    index: int
    port: int
    url: str  # no trailing slash


def manifest_instances(host: str, manifest: Mapping[str, Any]) -> list[Instance]:
    """The instances a manifest records, each with its endpoint as computed on the node at deploy time."""
    items = manifest.get("instances")
    if not isinstance(items, list) or not items:
        raise Day2Error(f"{host}: {MANIFEST} records no instances; {REDEPLOY}")
    if not all(isinstance(item, Mapping) for item in items):
        raise Day2Error(f"{host}: {MANIFEST} is in the old format (instances without endpoints); {REDEPLOY}")
    try:
        return [Instance(str(i["name"]), int(i["index"]), int(i["port"]), str(i["url"])) for i in items]
    except (KeyError, TypeError, ValueError):
        raise Day2Error(
            f"{host}: {MANIFEST} has an instance without name, index, port or url; {REDEPLOY}"
        ) from None


def read_manifest(session: NodeSession) -> dict[str, Any]:
    rc, out, err = session.run(f"cat {MANIFEST}", sudo=True)
    node = session.node
    if rc != 0 and "No such file" in err:
        raise Day2Error(f"{node.name}: no {MANIFEST}; {REDEPLOY}")
    if rc != 0:
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
    url: str
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


def instance_status(
    session: NodeSession, instance: Instance, token: str | None, model: str, key_error: str = ""
) -> InstanceStatus:
    """What `instance` says about itself; `key_error` is why there is no `token` (for the note)."""
    node = session.node
    status = InstanceStatus(instance.index, instance.port, instance.url, model=model)
    _, out, _ = session.run(f"systemctl is-active {shlex.quote(instance.name)}")
    status.service = out.strip() or "unknown"
    try:
        ready = session.http("GET", f"{instance.url}/readyz", timeout=15)
        status.ready = "yes" if ready.status == 200 else f"no ({readyz_state(ready)})"
    except Day2Error as exc:
        status.ready = "down" if "cannot connect" in str(exc) else "error"
        return status
    try:
        metrics = session.http("GET", f"{instance.url}/metrics", token=token, timeout=15)
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
            why = key_error.removeprefix(f"{node.name}: ") if token is None else "rejected"
            status.note = f"/metrics refused the API key ({why})"
        else:
            status.note = f"/metrics answered HTTP {metrics.status}"
    except Day2Error as exc:
        status.note = str(exc).removeprefix(f"{node.name}: ")
    except ValueError as exc:
        status.note = f"/metrics is not Prometheus text: {exc}"
    return status


def node_status(node: Node, state: Path) -> NodeStatus:
    result = NodeStatus(node.name, node.address, reachable=False, accelerator=node.accelerator or "")
    try:
        session = NodeSession(node).open()
    except Day2Error as exc:
        result.error = str(exc).removeprefix(f"{node.name}: ")
        return result
    with session:
        result.reachable = True
        try:
            if node.accelerator == "nvidia":
                result.driver, result.gpus = gpu_facts(session)
            manifest = read_manifest(session)
            instances = manifest_instances(node.name, manifest)
            try:
                token, key_error = node_api_key(state, node), ""
            except Day2Error as exc:
                token, key_error = None, str(exc)
            model = model_label(manifest)
            result.instances = [instance_status(session, i, token, model, key_error) for i in instances]
        except Day2Error as exc:
            result.error = str(exc).removeprefix(f"{node.name}: ")
    return result
