"""The `sdnode` command line end to end on the controller: exit codes and one-line errors, with real
ansible-inventory runs and real (refused) SSH connections, no node needed."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from PIL import Image
from sdnode.cli import main


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("SDNODE_STATE_DIR", str(path))
    monkeypatch.delenv("SDNODE_INVENTORY", raising=False)
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_inventory(path: Path, hosts: dict[str, dict]) -> Path:
    path.mkdir(parents=True)
    (path / "hosts.yml").write_text(json.dumps({"all": {"children": {"sdnodes": {"hosts": hosts}}}}))
    return path


@pytest.fixture
def unreachable(tmp_path: Path) -> Path:
    known = tmp_path / "known_hosts"
    known.write_text("")
    return write_inventory(
        tmp_path / "inv",
        {
            "gone1": {
                "ansible_host": "127.0.0.1",
                "ansible_port": closed_port(),
                "ansible_user": "root",
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={known}",
                "sdnode_accelerator": "cpu",
            },
        },
    )


def test_missing_inventory_is_one_line_and_exit_2(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["status", "-i", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sdnode: error: inventory") and "Traceback" not in err


def test_inventory_from_environment(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SDNODE_INVENTORY", str(tmp_path / "from-env"))
    assert main(["logs"]) == 2
    assert "from-env" in capsys.readouterr().err


def test_status_of_an_unreachable_node_is_unhealthy(
    state: Path, unreachable: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["status", "-i", str(unreachable)]) == 1
    out = capsys.readouterr().out
    assert "gone1" in out and "connection refused" in out and "0/1 node healthy" in out


def test_status_json(state: Path, unreachable: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "-i", str(unreachable), "--json"]) == 1
    [node] = json.loads(capsys.readouterr().out)
    assert (node["node"], node["reachable"], node["healthy"]) == ("gone1", False, False)


def test_logs_of_an_unreachable_node(state: Path, unreachable: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["logs", "-i", str(unreachable), "gone1"]) == 1
    assert "gone1: cannot reach" in capsys.readouterr().err


def test_smoke_with_an_unreachable_node_fails_and_still_draws_the_grid(
    state: Path, unreachable: Path, capsys: pytest.CaptureFixture
) -> None:
    (state / "api-keys").mkdir(parents=True)
    (state / "api-keys" / "gone1.default.key").write_text("generated-key-000000\n")
    assert main(["smoke", "-i", str(unreachable), "--size", "64x64"]) == 1
    out = capsys.readouterr().out
    assert (
        "gone1 FAILED: cannot reach" in out
        and "connection refused" in out
        and "0/1 instance generated" in out
    )
    grid = state / "smoke" / "grid.png"
    assert Image.open(grid).format == "PNG"
    assert out.splitlines()[-1] == f"grid: {grid}"  # printed last, to be found at a glance


def test_smoke_without_an_api_key_says_both_ways_to_get_one(
    state: Path, unreachable: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["smoke", "-i", str(unreachable)]) == 1
    out = capsys.readouterr().out
    assert "gone1 FAILED: no API key: set sd_service_api_keys" in out and "make deploy" in out


def test_smoke_refuses_a_bad_size_before_connecting(
    state: Path, unreachable: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["smoke", "-i", str(unreachable), "--size", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdnode: error: host gone1: size must look like 512x512") and err.count("\n") == 1
    assert not (state / "smoke").exists()


def test_smoke_refuses_half_a_size_from_the_inventory(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inventory = write_inventory(
        tmp_path / "inv", {"t1": {"sdnode_accelerator": "cpu", "sdnode_smoke_width": 64}}
    )
    assert main(["smoke", "-i", str(inventory)]) == 2
    assert "host t1: set sdnode_smoke_width and sdnode_smoke_height together" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "smoke", "logs"])
def test_a_node_without_an_accelerator_is_one_line_naming_it(
    command: str, state: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inventory = write_inventory(tmp_path / "inv", {"t1": {"sdnode_accelerator": "cpu"}, "t2": {}})
    assert main([command, "-i", str(inventory)]) == 2
    err = capsys.readouterr().err
    assert err == "sdnode: error: host t2: sdnode_accelerator is not set; declare nvidia or cpu for it\n"


def manifests(state: Path, **by_host: dict) -> None:
    (state / "manifests").mkdir(parents=True, exist_ok=True)
    for host, data in by_host.items():
        (state / "manifests" / f"{host}.json").write_text(json.dumps(data))


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    return write_inventory(
        tmp_path / "pair", {"a1": {"sdnode_accelerator": "cpu"}, "a2": {"sdnode_accelerator": "cpu"}}
    )


def test_diff_cached_identical(state: Path, pair: Path, capsys: pytest.CaptureFixture) -> None:
    manifests(
        state,
        a1={"host": "a1", "driver": None, "model": {"revision": "r1"}},
        a2={"host": "a2", "driver": None, "model": {"revision": "r1"}},
    )
    assert main(["diff-manifests", "-i", str(pair), "--cached"]) == 0
    assert "2 manifests identical" in capsys.readouterr().out


def test_diff_cached_one_field_changed(state: Path, pair: Path, capsys: pytest.CaptureFixture) -> None:
    manifests(
        state, a1={"host": "a1", "model": {"revision": "r1"}}, a2={"host": "a2", "model": {"revision": "r2"}}
    )
    assert main(["diff-manifests", "-i", str(pair), "--cached"]) == 1
    out = capsys.readouterr().out
    assert "model.revision" in out and "r1" in out and "r2" in out and "1 of 1 keys differ" in out
    assert main(["diff-manifests", "-i", str(pair), "--cached", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["differences"] == {"model.revision": {"a1": "r1", "a2": "r2"}}


def test_diff_cached_missing_manifest_is_an_error(
    state: Path, pair: Path, capsys: pytest.CaptureFixture
) -> None:
    manifests(state, a1={"host": "a1"})
    assert main(["diff-manifests", "-i", str(pair), "--cached"]) == 2
    assert "a2: no cached manifest" in capsys.readouterr().err


def test_diff_against_a_saved_manifest(
    state: Path, pair: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A rebuilt node against what it ran before: a deploy time differs by design, a package not."""
    saved = tmp_path / "saved"
    saved.mkdir()
    before = {"host": "a1", "deployed_at": "t1", "service": {"packages": {"torch": "2.14.1"}}}
    (saved / "a1.json").write_text(json.dumps(before))
    (saved / "a2.json").write_text(json.dumps({**before, "host": "a2"}))
    manifests(state, a1={**before, "deployed_at": "t2"}, a2={**before, "host": "a2"})
    assert main(["diff-manifests", "-i", str(pair), "--cached", "--against", str(saved)]) == 0
    assert capsys.readouterr().out.count("2 manifests identical") == 2
    manifests(state, a1={**before, "service": {"packages": {"torch": "2.13.0"}}})
    assert main(["diff-manifests", "-i", str(pair), "--cached", "--against", str(saved), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report[0]["differences"] == {"service.packages.torch": {"a1 (saved)": "2.14.1", "a1": "2.13.0"}}
    assert report[1]["identical"]
    # One saved file, compared with the one node --limit picks.
    one = ["diff-manifests", "-i", str(pair), "--cached", "--limit", "a2"]
    assert main([*one, "--against", str(saved / "a2.json")]) == 0


def test_keys_then_keys_again(state: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["keys"]) == 0
    assert (state / "keys" / "sdnode_ed25519").exists()
    assert main(["keys"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "--force"]) == 0


def test_bootstrap_without_a_key_pair(state: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bootstrap", "192.0.2.1", "--password-file", "/dev/null"]) == 2
    assert "sdnode keys" in capsys.readouterr().err


def test_bootstrap_without_a_password_off_a_terminal(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["keys"]) == 0
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # noqa: SIM115 - closed by pytest's teardown of sys.stdin
    assert main(["bootstrap", "-i", str(tmp_path / "none"), "192.0.2.1"]) == 2
    assert "--password-file" in capsys.readouterr().err
