"""`sdnode` day-2 commands against throwaway nodes: the real console script, real SSH, the real service.

Most tests use the node `deployed` converged with site.yml. To run them against a node deployed some other
way, set SDNODE_DAY2_INVENTORY (an inventory with that one node in sdnodes) and SDNODE_DAY2_STATE (the
state dir holding its api-keys/); `bootstrap` always boots its own password-login node.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
import pytest
import yaml
from PIL import Image
from sdnode.day2.inventory import load_nodes
from sdnode.day2.remote import NodeSession
from sdnode.day2.service import MANIFEST

from .conftest import STATE, explain, sdnode, tool

if TYPE_CHECKING:  # imported for the annotation only: pytest would try to collect the class
    from .conftest import TestNodes

pytestmark = pytest.mark.integration

BOOT_NODE = "boot1"


@dataclass
class Serving:
    node: str
    inventory: Path
    state: Path  # where the deploy left api-keys/ and manifests/


@pytest.fixture(scope="module")
def serving(request: pytest.FixtureRequest) -> Serving:
    inventory = os.environ.get("SDNODE_DAY2_INVENTORY")
    if inventory:
        listing = subprocess.run(
            [tool("ansible-inventory"), "-i", inventory, "--list"], capture_output=True, text=True, check=True
        )
        [node] = json.loads(listing.stdout)["sdnodes"]["hosts"]
        return Serving(node, Path(inventory), Path(os.environ.get("SDNODE_DAY2_STATE", STATE)))
    deployed = request.getfixturevalue("deployed")
    return Serving(deployed.node, deployed.inventory, STATE)


@pytest.fixture
def state(tmp_path: Path, serving: Serving) -> Path:
    """A state dir of the test's own (smoke images, fetched manifests) holding the deploy's API keys."""
    own = tmp_path / "state"
    (own / "api-keys").mkdir(parents=True)
    keys = sorted((serving.state / "api-keys").glob(f"{serving.node}.*.key"))
    assert keys, f"the deploy left no API key for {serving.node} in {serving.state / 'api-keys'}"
    for key in keys:
        shutil.copy2(key, own / "api-keys" / key.name)
    return own


def test_status_shows_the_node_ready(serving: Serving, state: Path) -> None:
    proc = sdnode("status", "-i", str(serving.inventory), "--json", state=state)
    assert proc.returncode == 0, explain(proc)
    [node] = json.loads(proc.stdout)
    assert (node["node"], node["reachable"], node["healthy"], node["driver"]) == (
        serving.node,
        True,
        True,
        "-",
    )
    [instance] = node["instances"]  # a cpu node runs sdserve@0 only
    assert (instance["instance"], instance["service"], instance["ready"]) == (0, "active", "yes")
    assert instance["queue_depth"] == 0 and instance["images"] is not None
    assert instance["model"] != "-" and "@" in instance["model"]
    assert instance["keys"] == "1"  # the one generated key, in force (not "stale")

    table = sdnode("status", "-i", str(serving.inventory), state=state)
    assert table.returncode == 0, explain(table)
    assert serving.node in table.stdout and "1/1 node healthy" in table.stdout


def node_hostvars(serving: Serving) -> dict:
    """The serving node's variables as Ansible resolves them, to write variant inventories from."""
    listing = subprocess.run(
        [tool("ansible-inventory"), "-i", str(serving.inventory), "--host", serving.node],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(listing.stdout)


@contextmanager
def manifest_changed(serving: Serving, change: Callable[[dict], None]) -> Iterator[None]:
    """The node's manifest as `change` leaves it, for the block; then the deploy's file, byte for byte."""
    [node] = load_nodes(str(serving.inventory))
    with NodeSession(node) as session:
        rc, out, err = session.run(f"cat {MANIFEST}", sudo=True)
        assert rc == 0, err
        manifest = json.loads(out)
        change(manifest)
        b64 = base64.b64encode(json.dumps(manifest).encode()).decode()
        # cp -p keeps the deploy's owner and mode; writing through the existing file keeps them too.
        rc, _, err = session.run(
            f"cp -p {MANIFEST} {MANIFEST}.orig && echo {b64} | base64 -d > {MANIFEST}", sudo=True
        )
        assert rc == 0, err
        try:
            yield
        finally:
            rc, _, err = session.run(f"mv -f {MANIFEST}.orig {MANIFEST}", sudo=True)
            assert rc == 0, err


def test_status_fails_when_an_instance_does_not_answer(serving: Serving, state: Path) -> None:
    """The manifest naming another port for the instance: the unit is active but nothing answers there."""

    def shift(manifest: dict) -> None:
        first = manifest["instances"][0]
        first.update(port=7990, url=first["url"].replace(f":{first['port']}", ":7990"))

    with manifest_changed(serving, shift):
        proc = sdnode("status", "-i", str(serving.inventory), "--json", state=state)
    assert proc.returncode == 1, explain(proc)
    [node] = json.loads(proc.stdout)
    [instance] = node["instances"]
    assert (node["healthy"], instance["port"], instance["service"], instance["ready"]) == (
        False,
        7990,
        "active",
        "down",
    )


def test_an_old_format_manifest_says_to_deploy(serving: Serving, state: Path) -> None:
    """A node deployed before instances recorded their endpoints: status and smoke say to deploy."""

    def old(manifest: dict) -> None:
        manifest["instances"] = [i["name"] for i in manifest["instances"]]

    with manifest_changed(serving, old):
        status = sdnode("status", "-i", str(serving.inventory), state=state)
        smoke = sdnode("smoke", "-i", str(serving.inventory), state=state)
    assert status.returncode == 1 and "old format" in status.stdout and "make deploy" in status.stdout, (
        explain(status)
    )
    assert smoke.returncode == 1 and "make deploy" in smoke.stdout, explain(smoke)


def test_smoke_saves_a_png_of_the_size_and_a_grid(serving: Serving, state: Path) -> None:
    before = json.loads(sdnode("status", "-i", str(serving.inventory), "--json", state=state).stdout)
    proc = sdnode(
        "smoke", "-i", str(serving.inventory), "--size", "64x64", "--steps", "2", "--seed", "5", state=state
    )
    assert proc.returncode == 0, explain(proc)
    assert f"[1/1] {serving.node}-0 ok" in proc.stdout  # not a terminal: one line per completion
    with Image.open(state / "smoke" / f"{serving.node}-0.png") as image:
        image.load()
        assert (image.format, image.size) == ("PNG", (64, 64))
        assert len(image.getcolors(maxcolors=1 << 16) or range(2)) > 1  # a picture, not a blank
    with Image.open(state / "smoke" / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width >= 64 and grid.height > 64  # the tile and its label
    # Then image to image from it, on the same instance: both paths the node serves.
    assert f"image to image: {serving.node}-0-img2img.png" in proc.stdout, explain(proc)
    with (
        Image.open(state / "smoke" / f"{serving.node}-0.png") as first,
        Image.open(state / "smoke" / f"{serving.node}-0-img2img.png") as redrawn,
    ):
        assert (redrawn.format, redrawn.size) == ("PNG", (64, 64))
        assert redrawn.tobytes() != first.tobytes()  # redrawn, not handed back
    after = json.loads(sdnode("status", "-i", str(serving.inventory), "--json", state=state).stdout)
    assert after[0]["instances"][0]["images"] == before[0]["instances"][0]["images"] + 2


def test_smoke_reports_the_service_refusal(serving: Serving, state: Path) -> None:
    proc = sdnode("smoke", "-i", str(serving.inventory), "--size", "60x64", state=state)
    assert proc.returncode == 1, explain(proc)
    assert f"{serving.node}-0 FAILED" in proc.stdout and "HTTP 422" in proc.stdout
    assert not (state / "smoke" / f"{serving.node}-0.png").exists()


def test_logs_returns_the_service_journal(serving: Serving, state: Path) -> None:
    proc = sdnode("logs", "-i", str(serving.inventory), serving.node, "--since", "1 day", state=state)
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith(f"{serving.node} | ") for line in lines), proc.stdout[-2000:]
    assert any("sdserve" in line for line in lines), proc.stdout[-2000:]
    newest = sdnode("logs", "-i", str(serving.inventory), "--since", "1 day", "-n", "2", state=state)
    assert newest.returncode == 0, explain(newest)
    tail = newest.stdout.splitlines()
    assert len(tail) == 2 and all(line.startswith(f"{serving.node} | ") for line in tail)

    def stamp(line: str) -> str:
        return line.split(" | ", 1)[1].split(" ", 1)[0]  # short-iso: sorts as text

    # The newest lines, not the first ones (journalctl -n with --since alone would give the first).
    assert stamp(tail[0]) >= stamp(lines[-2]) and stamp(tail[-1]) >= stamp(lines[-1])


def test_diff_manifests_live_and_against_a_changed_copy(
    serving: Serving, state: Path, tmp_path: Path
) -> None:
    one = sdnode("diff-manifests", "-i", str(serving.inventory), state=state)
    assert one.returncode == 0 and "nothing to compare" in one.stdout, explain(one)

    # The node twice under two names (same address): two live fetches of one manifest are identical.
    hostvars = node_hostvars(serving)
    twin = f"{serving.node}-twin"
    pair = tmp_path / "pair.yml"
    pair.write_text(
        yaml.safe_dump(
            {"all": {"children": {"sdnodes": {"hosts": {serving.node: hostvars, twin: hostvars}}}}}
        )
    )
    live = sdnode("diff-manifests", "-i", str(pair), "--json", state=state)
    assert live.returncode == 0, explain(live)
    assert json.loads(live.stdout)["identical"] is True

    # Cached copies with one field changed: exactly that field differs.
    manifest = json.loads((serving.state / "manifests" / f"{serving.node}.json").read_text())
    (state / "manifests").mkdir()
    (state / "manifests" / f"{serving.node}.json").write_text(json.dumps(manifest))
    manifest["model"]["checksums_sha256"] = "0" * 64
    manifest["host"] = twin
    (state / "manifests" / f"{twin}.json").write_text(json.dumps(manifest))
    cached = sdnode("diff-manifests", "-i", str(pair), "--cached", "--json", state=state)
    assert cached.returncode == 1, explain(cached)
    assert list(json.loads(cached.stdout)["differences"]) == ["model.checksums_sha256"]
    table = sdnode("diff-manifests", "-i", str(pair), "--cached", state=state)
    assert table.returncode == 1 and "model.checksums_sha256" in table.stdout and "1 of" in table.stdout


def test_keys_makes_a_private_pair_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = sdnode("keys", state=state)
    assert first.returncode == 0, explain(first)
    private = state / "keys" / "sdnode_ed25519"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public = private.with_name("sdnode_ed25519.pub").read_text()
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=True
    )
    assert derived.stdout.split()[:2] == public.split()[:2]
    again = sdnode("keys", state=state)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert private.with_name("sdnode_ed25519.pub").read_text() == public


def password_login(address: str, password: str, known_hosts: Path) -> paramiko.SSHClient:
    """A plain Paramiko password login (no keys, no agent), independent of sdnode's own code."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        address, username="root", password=password, look_for_keys=False, allow_agent=False, timeout=15
    )
    return client


def test_bootstrap_turns_a_password_node_into_a_key_only_node(testnodes: TestNodes, tmp_path: Path) -> None:
    testnodes.up(BOOT_NODE, "--password-login")
    inventory = testnodes.inventory(STATE / "ci" / "day2-bootstrap", [BOOT_NODE])
    hosts = yaml.safe_load((inventory / "hosts.yml").read_text())["all"]["children"]["sdnodes"]["hosts"]
    address = hosts[BOOT_NODE]["ansible_host"]
    known_hosts = STATE / "testnodes" / "known_hosts"
    password_file = STATE / "testnodes" / f"{BOOT_NODE}.password"
    password = password_file.read_text().strip()
    password_login(address, password, known_hosts).close()  # the starting point: passwords work

    state = tmp_path / "state"
    assert sdnode("keys", state=state).returncode == 0
    fleet_key = state / "keys" / "sdnode_ed25519"
    # By address, as for a server not yet in any inventory: an unknown host key is refused...
    new_known = tmp_path / "known_hosts"
    by_address = [
        "bootstrap",
        address,
        "--password-file",
        str(password_file),
        "--known-hosts",
        str(new_known),
    ]
    refused = sdnode(*by_address, state=state)
    assert refused.returncode == 2 and "--accept-new-host-key" in refused.stderr, explain(refused)
    # ...unless accepted explicitly; the key recorded is the node's own.
    proc = sdnode(*by_address, "--accept-new-host-key", state=state)
    assert proc.returncode == 0, explain(proc)
    assert "password login refused" in proc.stdout
    recorded = {tuple(line.split()[1:3]) for line in new_known.read_text().splitlines()}
    known = {
        tuple(line.split()[1:3])
        for line in known_hosts.read_text().splitlines()
        if line.split()[0] == address
    }
    assert recorded and recorded <= known

    # Key login with the fleet key alone, by OpenSSH.
    options = (
        "-o IdentitiesOnly=yes -o BatchMode=yes -o PasswordAuthentication=no -o StrictHostKeyChecking=yes"
    )
    ssh = subprocess.run(
        ["ssh", *options.split(), "-o", f"UserKnownHostsFile={known_hosts}", "-i", str(fleet_key),
         f"root@{address}", "id -un; sshd -T"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ssh.returncode == 0, ssh.stderr
    assert ssh.stdout.splitlines()[0] == "root"
    assert "passwordauthentication no" in ssh.stdout and "kbdinteractiveauthentication no" in ssh.stdout
    # The password no longer gets in.
    with pytest.raises(paramiko.AuthenticationException):
        password_login(address, password, known_hosts)

    # Again, through the inventory this time: nothing left to change.
    again = sdnode(
        "bootstrap", "-i", str(inventory), BOOT_NODE, "--password-file", str(password_file), state=state
    )
    assert again.returncode == 0, explain(again)
    assert "(0 changes)" in again.stdout
