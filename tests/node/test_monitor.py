"""sd_monitor as deployed: node_exporter on every host, Prometheus and Alertmanager on the monitors.

    pytest tests/node/test_monitor.py --hosts=ansible://sdmonitor --ansible-inventory=INV   # none skips
    pytest tests/node/test_monitor.py --hosts=ansible://all --ansible-inventory=INV         # every host

(testinfra matches a host pattern with fnmatch against group and host names, so Ansible's
`sdnodes:sdgateways:sdmonitor` matches nothing.) Which checks apply follows the inventory: the
exporter checks run on every host of an inventory that has sdmonitor hosts (the monitor playbook puts
node_exporter everywhere then), DCGM's on its sdnodes declared nvidia (there they fail, never skip:
the last one needs the GPUs), the monitor checks on the hosts of sdmonitor. The HTTP checks of
Prometheus run from here, the controller, the way an operator reaches it: its address, basic auth
with the controller's password file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, role_defaults

ROLE = "sd_monitor"
STATE = Path(os.environ.get("SDNODE_STATE_DIR", REPO / ".sdnode"))
RULES = REPO / "roles" / ROLE / "files" / "prometheus" / "rules"
RULES_DIR = "/etc/prometheus/rules.sdnode"


def fact(node_vars: dict, name: str, role: str = ROLE):
    return node_vars.get(name, role_defaults(role).get(name))


def address_of(variables: dict, name: str = "sd_monitor_exporter_address") -> str:
    """An address variable as the role resolves it by default: the inventory's, else the host's
    sdnode_fleet_address, else ansible_host."""
    for value in (variables.get(name), variables.get("sdnode_fleet_address")):
        if value and "{{" not in str(value):
            return str(value)
    value = variables.get("ansible_host", variables.get("inventory_hostname"))
    return str(value)


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@pytest.fixture(scope="module")
def groups(node_vars) -> dict[str, list[str]]:
    return node_vars.get("groups", {})


@pytest.fixture(scope="module")
def monitored(groups) -> None:
    """Exporters are expected on every host once the inventory has a monitor."""
    if not groups.get("sdmonitor"):
        pytest.skip("no sdmonitor hosts in the inventory: no exporters expected")


@pytest.fixture(scope="module")
def monitor(node_vars) -> None:
    if "sdmonitor" not in node_vars.get("group_names", []):
        pytest.skip("not a host of sdmonitor")


# --- Exporters (every host) -------------------------------------------------------------------------


def test_node_exporter_runs_and_starts_at_boot(host, monitored) -> None:
    service = host.service("prometheus-node-exporter")
    assert service.is_running and service.is_enabled


def test_node_exporter_listens_on_the_host_address_only(host, node_vars, monitored) -> None:
    port = fact(node_vars, "sdnode_node_exporter_port", "sdnode")
    address = address_of(node_vars)
    assert host.socket(f"tcp://{address}:{port}").is_listening
    for other in ("0.0.0.0", "::", "127.0.0.1"):
        assert not host.socket(f"tcp://{other}:{port}").is_listening, f"{other}:{port}"


def test_node_exporter_serves_metrics(host, node_vars, monitored) -> None:
    port = fact(node_vars, "sdnode_node_exporter_port", "sdnode")
    out = host.check_output(f"curl -sf http://{hostport(address_of(node_vars), port)}/metrics")
    assert "node_exporter_build_info" in out


# --- DCGM's exporter (sdnodes declared nvidia) -------------------------------------------------------


@pytest.fixture(scope="module")
def dcgm(node_vars, monitored) -> None:
    """Selects the DCGM checks by declaration, as the monitor's "dcgm" targets: sdnodes declared nvidia.
    On such a node (in an inventory with a monitor) none of them skips."""
    if "sdnodes" not in node_vars.get("group_names", []) or node_vars.get("sdnode_accelerator") != "nvidia":
        pytest.skip("not an sdnode declared nvidia: no DCGM exporter expected")


def upstream(version: str) -> str:
    """Package version 1:4.5.3-1 -> 4.5.3."""
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


def test_dcgm_packages_are_the_pinned_pair_and_held(host, node_vars, dcgm) -> None:
    cuda = fact(node_vars, "sd_monitor_dcgm_cuda_major")
    dcgm_version = fact(node_vars, "sd_monitor_dcgm_version")
    wanted = {
        "datacenter-gpu-manager-4-core": dcgm_version,
        f"datacenter-gpu-manager-4-cuda{cuda}": dcgm_version,
        "datacenter-gpu-manager-exporter": fact(node_vars, "sd_monitor_dcgm_exporter_version"),
    }
    packages = {name: host.package(name) for name in wanted}
    installed = {name: pkg.version if pkg.is_installed else None for name, pkg in packages.items()}
    assert installed == wanted
    if fact(node_vars, "sd_monitor_dcgm_hold"):
        held = set(host.check_output("apt-mark showhold").split())
        assert set(wanted) <= held, held


def test_dcgm_exporter_binary_is_paired_with_the_installed_dcgm(host, node_vars, dcgm) -> None:
    pair = f"{upstream(fact(node_vars, 'sd_monitor_dcgm_version'))}-" + upstream(
        fact(node_vars, "sd_monitor_dcgm_exporter_version")
    )
    assert pair in host.check_output("dcgm-exporter --version")


@pytest.mark.parametrize("unit", ["nvidia-dcgm", "nvidia-dcgm-exporter"])
def test_dcgm_units_run_and_start_at_boot(host, dcgm, unit: str) -> None:
    service = host.service(unit)
    assert service.is_running and service.is_enabled


def test_dcgm_exporter_listens_on_the_host_address_only(host, node_vars, dcgm) -> None:
    port = fact(node_vars, "sdnode_dcgm_exporter_port", "sdnode")
    assert host.socket(f"tcp://{address_of(node_vars)}:{port}").is_listening
    for other in ("0.0.0.0", "::", "127.0.0.1"):
        assert not host.socket(f"tcp://{other}:{port}").is_listening, f"{other}:{port}"


def test_dcgm_exporter_reports_every_gpu_with_what_the_rules_read(host, node_vars, dcgm) -> None:
    """The GPU-only proof: nv-hostengine reads the GPUs through NVML and the exporter serves, for every
    GPU nvidia-smi lists (by UUID), each DCGM metric the rules use."""
    smi = host.run("nvidia-smi --query-gpu=uuid --format=csv,noheader")
    assert smi.rc == 0, f"nvidia-smi failed on a node declared nvidia: {smi.stderr or smi.stdout}"
    uuids = {line.strip() for line in smi.stdout.splitlines() if line.strip()}
    assert uuids, "nvidia-smi lists no GPU"
    port = fact(node_vars, "sdnode_dcgm_exporter_port", "sdnode")
    metrics = host.check_output(f"curl -sf http://{hostport(address_of(node_vars), port)}/metrics")
    wanted = {
        name
        for path in RULES.glob("*.yml")
        for name in re.findall(r"\b(DCGM_FI_[A-Z0-9_]+)\{job=\"dcgm\"", path.read_text())
    }
    assert wanted
    for name in sorted(wanted):
        seen = set(re.findall(rf'^{name}{{[^}}]*UUID="([^"]+)"', metrics, re.M))
        assert seen == uuids, (name, seen, uuids)


# --- The monitor: files and services on the host -----------------------------------------------------


@pytest.mark.parametrize("unit", ["prometheus", "prometheus-alertmanager"])
def test_monitor_services_run_and_start_at_boot(host, monitor, unit: str) -> None:
    service = host.service(unit)
    assert service.is_running and service.is_enabled


def test_prometheus_listens_on_the_host_address_and_alertmanager_on_loopback(
    host, node_vars, monitor
) -> None:
    port = fact(node_vars, "sdnode_prometheus_port", "sdnode")
    address = address_of(node_vars, "sd_monitor_prometheus_listen_address")
    am_port = fact(node_vars, "sd_monitor_alertmanager_port")
    assert host.socket(f"tcp://{address}:{port}").is_listening
    assert host.socket(f"tcp://127.0.0.1:{am_port}").is_listening
    for other in ("0.0.0.0", "::"):
        assert not host.socket(f"tcp://{other}:{port}").is_listening
        assert not host.socket(f"tcp://{other}:{am_port}").is_listening
        assert not host.socket(f"tcp://{other}:9094").is_listening, "Alertmanager's cluster port is open"


@pytest.mark.parametrize(
    "path", ["prometheus.yml", "web.yml", "sdserve.key", "alertmanager.yml"], ids=lambda p: p
)
def test_configs_and_the_key_are_private_to_prometheus(host, monitor, path: str) -> None:
    with host.sudo():
        f = host.file(f"/etc/prometheus/{path}")
        assert f.exists
        assert (f.user, f.group, f.mode) == ("root", "prometheus", 0o640)


@pytest.mark.parametrize(
    "command",
    [
        "promtool check config /etc/prometheus/prometheus.yml",
        "promtool check web-config /etc/prometheus/web.yml",
        "amtool check-config /etc/prometheus/alertmanager.yml",
    ],
    ids=["config", "web-config", "alertmanager"],
)
def test_configs_validate(host, monitor, command: str) -> None:
    with host.sudo():
        host.run_test(command)  # raises with the output when the exit code is not 0


def test_installed_rules_are_the_roles(host, monitor) -> None:
    wanted = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in RULES.glob("*.yml")}
    with host.sudo():
        present = {
            Path(line.split()[1]).name: line.split()[0]
            for line in host.check_output(f"sha256sum {RULES_DIR}/*").splitlines()
        }
    assert present == wanted


def test_the_key_stays_out_of_the_scrape_config(host, monitor) -> None:
    with host.sudo():
        key = host.file("/etc/prometheus/sdserve.key").content_string.strip()
        config = host.file("/etc/prometheus/prometheus.yml").content_string
    assert len(key) >= 16 and key not in config
    assert "credentials_file: /etc/prometheus/sdserve.key" in config


def test_web_config_holds_only_a_bcrypt_hash(host, node_vars, monitor) -> None:
    with host.sudo():
        web = yaml.safe_load(host.file("/etc/prometheus/web.yml").content_string)
    users = web["basic_auth_users"]
    assert list(users) == [fact(node_vars, "sd_monitor_prometheus_basic_auth_user")]
    assert all(h.startswith("$2b$") for h in users.values())


# --- The monitor as the controller sees it -------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(node_vars, monitor):
    """GET on Prometheus's API from the controller with the basic-auth credentials; (status, JSON)."""
    if "sd_monitor_prometheus_basic_auth_password" in node_vars:
        pytest.skip("the password comes from the inventory (Vault): these checks read the generated file")
    auth_file = Path(
        str(fact(node_vars, "sd_monitor_prometheus_basic_auth_file")).replace(
            "{{ sdnode_state_dir }}", str(STATE)
        )
    )
    credentials = auth_file.read_text().strip()
    assert auth_file.stat().st_mode & 0o077 == 0, f"{auth_file} is readable by others"
    base = "http://" + hostport(
        address_of(node_vars, "sd_monitor_prometheus_listen_address"),
        fact(node_vars, "sdnode_prometheus_port", "sdnode"),
    )

    def get(path: str, auth: str | None = credentials) -> tuple[int, dict]:
        request = urllib.request.Request(base + path)
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, {}

    return get


def test_prometheus_refuses_requests_without_the_password(prometheus) -> None:
    assert prometheus("/api/v1/targets", auth=None)[0] == 401
    assert prometheus("/api/v1/targets", auth="sdnode:wrong")[0] == 401


def test_every_target_is_up(prometheus, groups) -> None:
    """Every job's targets are the fleet's hosts and instances, and all of them are up."""
    deadline = time.monotonic() + 90  # a target added by this run waits for its first scrape
    while True:
        status, body = prometheus("/api/v1/targets")
        assert status == 200, status
        targets = body["data"]["activeTargets"]
        if all(t["health"] == "up" for t in targets) or time.monotonic() > deadline:
            break
        time.sleep(5)
    down = [(t["labels"]["instance"], t["health"], t["lastError"]) for t in targets if t["health"] != "up"]
    assert not down, down
    nodes = {t["labels"]["node"] for t in targets if t["labels"]["job"] == "node"}
    assert nodes == set(
        groups.get("sdnodes", []) + groups.get("sdgateways", []) + groups.get("sdmonitor", [])
    )
    gateways = {t["labels"]["node"] for t in targets if t["labels"]["job"] == "haproxy"}
    assert gateways == set(groups.get("sdgateways", []))
    serving = {t["labels"]["node"] for t in targets if t["labels"]["job"] == "sdserve"}
    assert serving == set(groups.get("sdnodes", []))


def test_sdserve_targets_are_the_instances_the_nodes_recorded(prometheus, groups) -> None:
    manifests = [STATE / "manifests" / f"{node}.json" for node in groups.get("sdnodes", [])]
    if not all(m.exists() for m in manifests):
        pytest.skip("the nodes' manifests were not fetched to this controller")
    wanted = {
        inst["url"].split("//", 1)[1]
        for manifest in manifests
        for inst in json.loads(manifest.read_text())["instances"]
    }
    _, body = prometheus("/api/v1/targets")
    got = {t["labels"]["instance"] for t in body["data"]["activeTargets"] if t["labels"]["job"] == "sdserve"}
    assert got == wanted


def test_the_roles_rules_are_loaded(prometheus) -> None:
    wanted = {
        group["name"]: len(group["rules"])
        for path in RULES.glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
    }
    status, body = prometheus("/api/v1/rules")
    assert status == 200
    loaded = {group["name"]: len(group["rules"]) for group in body["data"]["groups"]}
    assert loaded == wanted
    assert all(r["health"] == "ok" for g in body["data"]["groups"] for r in g["rules"])


def test_prometheus_sends_alerts_to_its_alertmanager(prometheus, node_vars) -> None:
    _, body = prometheus("/api/v1/alertmanagers")
    port = fact(node_vars, "sd_monitor_alertmanager_port")
    assert [a["url"] for a in body["data"]["activeAlertmanagers"]] == [
        f"http://127.0.0.1:{port}/api/v2/alerts"
    ]


def test_alertmanager_routes_to_the_inventory_receiver(host, node_vars, monitor) -> None:
    port = fact(node_vars, "sd_monitor_alertmanager_port")
    status = json.loads(host.check_output(f"curl -sf http://127.0.0.1:{port}/api/v2/status"))
    config = yaml.safe_load(status["config"]["original"])
    webhook = node_vars.get("sd_monitor_alertmanager_webhook_url") or ""
    email = node_vars.get("sd_monitor_alertmanager_email_to") or ""
    receivers = {r["name"]: r for r in config["receivers"]}
    if webhook or email:
        assert config["route"]["receiver"] == "sdnode"
        assert bool(receivers["sdnode"].get("webhook_configs")) == bool(webhook)
        assert bool(receivers["sdnode"].get("email_configs")) == bool(email)
    else:
        # Explicitly nobody: a receiver with no integration, named so.
        assert config["route"]["receiver"] == "null"
        assert receivers == {"null": {"name": "null"}}
