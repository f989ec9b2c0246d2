"""The release python_env built and sd_service switched to: links, stamp, venv, pinned packages."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import setting

ROOT = "/opt/sdserve"


def link_target(host, name: str) -> str:
    f = host.file(f"{ROOT}/{name}")
    assert f.is_symlink, f"{ROOT}/{name} is not a symlink"
    return f.linked_to


@pytest.fixture(scope="module")
def current(host) -> str:
    return link_target(host, "current")


@pytest.fixture(scope="module")
def manifest(host) -> dict:
    return json.loads(host.file("/etc/sdserve/manifest.json").content_string)


def test_current_points_at_a_finished_release(host, current):
    assert re.fullmatch(rf"{ROOT}/releases/[0-9a-f]{{12}}", current), current
    stamp = host.file(f"{current}/.complete")
    assert stamp.is_file, "the live release has no completion stamp"
    assert f"release={current.rsplit('/', 1)[1]}" in stamp.content_string


def test_manifest_names_the_live_release(current, manifest):
    assert manifest["release_id"] == current.rsplit("/", 1)[1]


def test_previous_is_another_finished_release(host, current):
    prev = host.file(f"{ROOT}/previous")
    if not prev.exists:
        pytest.skip("a node deployed once has no previous release")
    assert prev.linked_to != current
    assert host.file(f"{prev.linked_to}/.complete").is_file


def test_release_count_is_bounded(host, node_vars):
    keep = int(setting(node_vars, "python_env", "python_env_keep_releases"))
    releases = host.run(f"ls -1 {ROOT}/releases").stdout.split()
    assert 1 <= len(releases) <= max(keep, 2), releases


def test_release_tree_is_root_owned_and_not_writable_by_the_service(host, current):
    for path in (ROOT, f"{ROOT}/releases", current, f"{current}/venv", f"{current}/venv/bin"):
        f = host.file(path)
        assert f.user == "root" and f.group == "root", path
        assert not f.mode & 0o022, f"{path} is group/world writable: {oct(f.mode)}"
    writable = host.run(f"find {current} -perm /022 ! -type l -print -quit").stdout.strip()
    assert not writable, f"writable by others: {writable}"


def test_installed_packages_match_the_lock(host, current):
    """Every `name==version` of the lock copied into the release is what pip reports installed."""
    lock = host.file(f"{current}/requirements.txt").content_string
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", lock, re.MULTILINE))
    assert "torch" in pins and "diffusers" in pins
    out = host.check_output(
        f"{current}/venv/bin/python -m pip list --format=json --disable-pip-version-check"
    )
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}
    wrong = {
        name: (version, installed.get(name.lower().replace("_", "-")))
        for name, version in pins.items()
        if installed.get(name.lower().replace("_", "-")) != version
    }
    assert not wrong, f"lock pin vs installed: {wrong}"


def test_dependencies_are_consistent(host, current):
    assert host.run(f"{current}/venv/bin/python -m pip check --disable-pip-version-check").rc == 0


def test_torch_build_is_the_locks_and_fits_the_accelerator(host, current, accelerator):
    """The release runs exactly the torch its lock pins. A CPU node may run a CUDA lock (Ubuntu has no
    CPU lock: its torch runs on the CPU); an nvidia node never runs the CPU build."""
    version = host.check_output(f"{current}/venv/bin/python -c 'import torch; print(torch.__version__)'")
    lock = host.file(f"{current}/requirements.txt").content_string
    pinned = re.search(r"^torch==(\S+)", lock, re.MULTILINE)
    assert pinned, f"{current}/requirements.txt pins no torch"
    # PyPI's CUDA build reports a local tag the lock does not pin (2.14.1+cu130 for torch==2.14.1).
    same = version == pinned[1] or ("+" not in pinned[1] and version.split("+")[0] == pinned[1])
    assert same and version.endswith("+cpu") == pinned[1].endswith("+cpu"), (
        f"the release runs torch {version}, its lock pins {pinned[1]}"
    )
    if accelerator == "nvidia":
        assert "+cpu" not in version, f"nvidia node runs the CPU build of torch ({version})"


def test_service_command_is_the_release_one(host):
    cmd = host.check_output(f"{ROOT}/current/venv/bin/sdserve --help")
    assert "serve" in cmd
