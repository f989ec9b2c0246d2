"""sd_service on the node: account, configuration, hardened units, API and the node manifest."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from .conftest import REPO

STATE = Path(os.environ.get("SDNODE_STATE_DIR", REPO / ".sdnode"))
ETC = "/etc/sdserve"
KEY_LINE = re.compile(r"^sha256:[0-9a-f]{64} [A-Za-z0-9_.@:-]{1,64}$")

# The request goes through the node's own python3, fed on stdin so the key is not in any argv.
REQUEST = """
import base64, json, sys, urllib.request, urllib.error
url, key, body = sys.stdin.read().split("\\n", 2)
headers = {"Content-Type": "application/json"}
if key:
    headers["Authorization"] = "Bearer " + key
method = "POST" if body else "GET"
req = urllib.request.Request(url, data=body.encode() or None, method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=600) as r:
        status, data = r.status, r.read()
except urllib.error.HTTPError as e:
    status, data = e.code, e.read()
print(json.dumps({"status": status, "body": base64.b64encode(data).decode()}))
"""


def call(host, url: str, key: str = "", body: dict | None = None) -> tuple[int, bytes]:
    payload = f"{url}\n{key}\n{json.dumps(body) if body else ''}"
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731 - shell-safe, no quoting
    cmd = f'echo {b64(payload)} | base64 -d | python3 -c "$(echo {b64(REQUEST)} | base64 -d)"'
    out = json.loads(host.check_output(cmd))
    return out["status"], base64.b64decode(out["body"])


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


@pytest.fixture(scope="module")
def manifest(host) -> dict:
    return json.loads(host.file(f"{ETC}/manifest.json").content_string)


@pytest.fixture(scope="module")
def instances(manifest) -> list[dict]:
    """Each instance as the node recorded it: name, index, port and the url the node reaches it by."""
    found = manifest.get("instances")
    assert found and all(isinstance(i, dict) for i in found), (
        f"manifest instances without endpoints (an old deploy?): {found!r}"
    )
    return found


@pytest.fixture(scope="module")
def api_key(node_vars) -> str:
    """The key the controller holds for this node, chosen by the day-2 tools' own rule."""
    from sdnode.day2.service import api_key, generated_key_path  # the controller's package: not on a node

    host = node_vars["inventory_hostname"]
    fleet = bool((node_vars.get("groups") or {}).get("sdgateways"))  # behind gateways: the fleet's keys
    if not node_vars.get("sd_service_api_keys"):
        path = generated_key_path(STATE, host, node_vars, fleet)
        assert path.is_file(), f"no key for this node on the controller at {path}"
        assert path.stat().st_mode & 0o777 == 0o600, f"{path} is not 0600"
    return api_key(STATE, host, node_vars, fleet=fleet)


def test_service_account_is_a_system_user_without_login(host):
    user = host.user("sdserve")
    assert user.exists and user.uid < 1000
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")
    assert user.group == "sdserve"


@pytest.mark.parametrize("name", ["sdserve.env", "api-keys", "manifest.json"])
def test_config_files_are_private_to_the_service(host, name):
    f = host.file(f"{ETC}/{name}")
    assert f.is_file and (f.user, f.group, f.mode) == ("root", "sdserve", 0o640), (
        f.user,
        f.group,
        oct(f.mode),
    )


def test_config_dir_is_closed_to_others(host):
    d = host.file(ETC)
    assert (d.user, d.group, d.mode) == ("root", "sdserve", 0o750)


def test_key_file_holds_hashes_only(host, api_key):
    lines = [
        ln for ln in host.file(f"{ETC}/api-keys").content_string.splitlines() if ln and not ln.startswith("#")
    ]
    assert lines and all(KEY_LINE.match(ln) for ln in lines), lines
    assert api_key not in host.file(f"{ETC}/api-keys").content_string


def test_key_is_nowhere_on_the_node(host, api_key):
    """The plain key must not be in /etc, the release tree, the journal or any world-readable file."""
    found = host.run(
        f"grep -rlF -- {quote(api_key)} /etc /opt/sdserve /var/lib/sdserve /root /tmp 2>/dev/null"
    )
    assert found.stdout.strip() == "", found.stdout
    journal = host.run(f"journalctl --no-pager -o cat | grep -cF -- {quote(api_key)}")
    assert journal.stdout.strip() == "0"


def test_each_instance_is_enabled_and_running(host, instances):
    for instance in instances:
        svc = host.service(f"{instance['name']}.service")
        assert svc.is_enabled and svc.is_running, instance["name"]


def test_one_instance_per_gpu_or_one_on_cpu(instances, accelerator):
    names = [i["name"] for i in instances]
    if accelerator == "cpu":
        assert names == ["sdserve@0"]
    else:
        assert names and all(re.fullmatch(r"sdserve@\d+", n) for n in names)
    assert names == [f"sdserve@{i['index']}" for i in instances]


def test_each_instance_url_names_its_port_and_listen_address(instances, manifest):
    """The recorded url reaches the instance from the node: its own port, the listen address itself
    unless that is a wildcard (then loopback); IPv6 in brackets; no trailing slash."""
    listen = manifest["listen"]
    for instance in instances:
        url = urlsplit(instance["url"])
        assert (url.scheme, url.port, url.path) == ("http", instance["port"], ""), instance
        if listen in ("0.0.0.0", "::", "localhost"):
            assert url.hostname in ("127.0.0.1", "::1"), instance
        else:
            assert url.hostname == listen, instance


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "User": "sdserve",
    "Restart": "on-failure",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize("prop", sorted(HARDENING))
def test_unit_hardening_in_force(host, prop):
    value = host.check_output(f"systemctl show sdserve@0.service --property={prop} --value")
    assert value == HARDENING[prop], f"{prop}={value!r}"


def test_unit_address_families_are_restricted(host):
    value = host.check_output("systemctl show sdserve@0.service --property=RestrictAddressFamilies --value")
    assert set(value.split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}, value


def test_unit_stop_timeout_covers_the_drain_and_the_stop(host):
    stop = host.check_output("systemctl show sdserve@0.service --property=TimeoutStopUSec --value")
    env = host.file(f"{ETC}/sdserve.env").content_string
    drain = float(re.search(r"^SDSERVE_DRAIN_TIMEOUT_S=(\S+)$", env, re.MULTILINE)[1])
    minutes = re.search(r"(\d+)min", stop)
    seconds = re.search(r"(\d+)s", stop)
    total = (int(minutes[1]) * 60 if minutes else 0) + (int(seconds[1]) if seconds else 0)
    # sdserve exits within 20 s of its drain running out (STOP_GRACE_S); systemd must wait that long.
    assert total >= drain + 20, f"TimeoutStopSec {stop} is below the drain {drain}s + 20 s"


def test_security_exposure_is_at_most_2(host):
    out = host.check_output("systemd-analyze security --no-pager sdserve@0.service")
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)[1])
    assert score <= 2.0, f"exposure {score}"


def test_cpu_instance_sees_no_devices(host, accelerator):
    if accelerator != "cpu":
        pytest.skip("GPU nodes get their device list instead (gpu_node tier)")
    assert host.check_output("systemctl show sdserve@0.service --property=PrivateDevices --value") == "yes"


@pytest.mark.gpu_node
def test_gpu_instance_may_use_its_gpu_only(host, instances):
    for instance in instances:
        unit, index = instance["name"], str(instance["index"])
        allow = host.check_output(f"systemctl show {unit}.service --property=DeviceAllow --value")
        assert f"/dev/nvidia{index} rw" in allow and "/dev/nvidiactl rw" in allow, allow
        other = [d for d in re.findall(r"/dev/nvidia(\d+)", allow) if d != index]
        assert not other, f"{unit} may open other GPUs: {other}"
        env = host.file(f"{ETC}/instance-{index}.env").content_string
        assert f"CUDA_VISIBLE_DEVICES={index}\n" in env


def test_listens_only_where_configured(host, instances, manifest):
    for instance in instances:
        port = instance["port"]
        assert host.socket(f"tcp://{manifest['listen']}:{port}").is_listening
        if manifest["listen"] in ("127.0.0.1", "localhost"):
            assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening


def test_readyz_answers_ready(host, instances):
    for instance in instances:
        status, body = call(host, f"{instance['url']}/readyz")
        assert status == 200 and json.loads(body)["status"] == "ready", body


def test_generation_without_a_key_is_refused(host, instances):
    body = {"prompt": "x", "size": "64x64", "steps": 1}
    status, _ = call(host, f"{instances[0]['url']}/v1/images/generations", body=body)
    assert status == 401


def generate(host, url, key, seed) -> tuple[int, bytes]:
    body = {"prompt": "a lighthouse at dusk", "size": "64x64", "steps": 2, "seed": seed, "n": 1}
    status, raw = call(host, f"{url}/v1/images/generations", key, body)
    assert status == 200, raw[:500]
    return status, base64.b64decode(json.loads(raw)["data"][0]["b64_json"])


def test_sample_generation_is_a_png_of_the_requested_size(host, instances, api_key):
    for instance in instances:
        _, png = generate(host, instance["url"], api_key, seed=7)
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            assert img.format == "PNG" and img.size == (64, 64)


def test_same_seed_gives_the_same_bytes(host, instances, api_key):
    url = instances[0]["url"]
    first = generate(host, url, api_key, seed=1234)[1]
    again = generate(host, url, api_key, seed=1234)[1]
    other = generate(host, url, api_key, seed=1235)[1]
    assert first == again
    assert first != other


MANIFEST_KEYS = {
    "kit_version",
    "os",
    "kernel",
    "driver",
    "accelerator",
    "release_id",
    "model",
    "instances",
    "service",
}


def test_manifest_is_complete(manifest, accelerator):
    assert set(manifest) >= MANIFEST_KEYS, MANIFEST_KEYS - set(manifest)
    assert manifest["kit_version"] == (REPO / "VERSION").read_text().strip()
    assert manifest["accelerator"] == accelerator
    assert manifest["service"]["torch"] and manifest["service"]["diffusers"]
    if accelerator == "nvidia":
        assert manifest["driver"], "nvidia node manifest has no driver version"


def test_manifest_was_fetched_to_the_controller(manifest, node_vars):
    fetched = STATE / "manifests" / f"{node_vars['inventory_hostname']}.json"
    assert fetched.is_file(), fetched
    assert json.loads(fetched.read_text()) == manifest


@pytest.mark.gpu_runtime
def test_torch_sees_cuda(host):
    out = host.check_output(
        "/opt/sdserve/current/venv/bin/python -c 'import torch; print(torch.cuda.is_available())'"
    )
    assert out == "True"


@pytest.mark.gpu_runtime
def test_generation_runs_on_cuda(host):
    out = host.run(
        "set -a; . /etc/sdserve/sdserve.env; runuser -u sdserve -- env CUDA_VISIBLE_DEVICES=0 "
        "/opt/sdserve/current/venv/bin/sdserve check --json --steps 2 --size 64x64"
    )
    assert out.rc == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["device"].startswith("cuda")
