"""The model model_cache put on the node: in place, verified, private to the service."""

from __future__ import annotations

import hashlib
import json

import pytest

MODELS = "/var/lib/sdserve/models"
MANIFEST = "sdnode-checksums.sha256"


@pytest.fixture(scope="module")
def model_dir(host) -> str:
    link = host.file(f"{MODELS}/current")
    assert link.is_symlink, f"{MODELS}/current is not a symlink"
    return link.linked_to


def test_current_link_points_at_a_model(host, model_dir):
    assert model_dir.startswith(f"{MODELS}/")
    assert host.file(f"{model_dir}/model_index.json").is_file


def test_files_match_the_checksum_manifest(host, model_dir):
    result = host.run(f"cd {model_dir} && sha256sum --check --strict --quiet {MANIFEST}")
    assert result.rc == 0, result.stdout + result.stderr


def test_manifest_covers_every_file(host, model_dir):
    listed = host.file(f"{model_dir}/{MANIFEST}").content_string.splitlines()
    on_disk = host.check_output(f"cd {model_dir} && find . -type f ! -name {MANIFEST} | wc -l")
    assert len(listed) == int(on_disk) > 0


def test_model_is_readable_by_the_service_group_only(host, model_dir):
    top = host.file(model_dir)
    assert (top.user, top.group, top.mode) == ("root", "sdserve", 0o750)
    loose = host.run(f"find {model_dir} \\( -perm /o+rwx -o -perm /g+w \\) -print -quit").stdout.strip()
    assert not loose, f"readable by others or group-writable: {loose}"
    wrong_owner = host.run(
        f"find {model_dir} \\( ! -user root -o ! -group sdserve \\) -print -quit"
    ).stdout.strip()
    assert not wrong_owner, f"not root:sdserve: {wrong_owner}"


def test_service_user_reads_the_model_and_others_cannot(host, model_dir):
    assert host.run(f"runuser -u sdserve -- cat {model_dir}/model_index.json").rc == 0
    assert host.run(f"runuser -u nobody -- cat {model_dir}/model_index.json").rc != 0


def test_service_is_pointed_at_the_live_model(host, model_dir):
    env = host.file("/etc/sdserve/sdserve.env").content_string
    assert f"SDSERVE_MODEL={model_dir}\n" in env
    assert "HF_HUB_OFFLINE=1\n" in env


def test_node_manifest_records_the_model_and_its_checksum(host, model_dir):
    manifest = json.loads(host.file("/etc/sdserve/manifest.json").content_string)
    checksums = host.file(f"{model_dir}/{MANIFEST}").content_string.encode()
    assert manifest["model"]["path"] == model_dir
    assert manifest["model"]["checksums_sha256"] == hashlib.sha256(checksums).hexdigest()
    assert manifest["model"]["id"] and manifest["model"]["revision"]


def test_no_staging_left_behind(host):
    leftovers = host.run(f"find {MODELS} -maxdepth 1 -name '.staging-*' -print").stdout.strip()
    assert not leftovers, leftovers
