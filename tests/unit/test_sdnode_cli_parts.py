"""sdnode's pure parts: metrics, manifest diff and instances, grid, keys (SSH and API), smoke requests and
answers, journal."""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
from pathlib import Path

import paramiko
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from sdnode.cli import journal_command, journal_since
from sdnode.day2 import Day2Error
from sdnode.day2.bootstrap import authorized_keys_script
from sdnode.day2.grid import LABEL_HEIGHT, MIN_TILE, PAD, grid_shape, make_grid, tile_origin
from sdnode.day2.inventory import node_from_vars
from sdnode.day2.keys import generate_key_pair, read_public_key
from sdnode.day2.manifest import MISSING, diff_manifests, flatten
from sdnode.day2.metrics import fmt_number, parse_figures
from sdnode.day2.service import (
    Instance,
    InstanceStatus,
    api_key,
    manifest_instances,
    model_label,
    parse_driver,
)
from sdnode.day2.smoke import (
    SmokeResult,
    decode_png,
    error_detail,
    img2img_body,
    node_request,
    parse_size,
    request_body,
)

# ---------------------------------------------------------------------------------------------
# metrics


def service_like_metrics(queue: int, images_by_key: dict[str, int], ready: int) -> str:
    """Prometheus text exposed the way sdserve's registry does (same names, types and labels)."""
    registry = CollectorRegistry()
    Gauge("sdserve_queue_depth", "Requests waiting", registry=registry).set(queue)
    images = Counter("sdserve_images", "Images generated", ["key"], registry=registry)
    for key, count in images_by_key.items():
        images.labels(key=key).inc(count)
    Gauge("sdserve_ready", "ready", registry=registry).set(ready)
    Counter("sdserve_requests", "HTTP requests", ["route"], registry=registry).labels(route="/readyz").inc(7)
    return generate_latest(registry).decode()


def test_figures_sum_images_over_keys() -> None:
    figures = parse_figures(service_like_metrics(3, {"default": 5, "ops": 2}, 1))
    assert (figures.queue_depth, figures.images, figures.ready) == (3, 7, 1)


def test_images_zero_before_the_first_generation() -> None:
    figures = parse_figures(service_like_metrics(0, {}, 0))
    assert (figures.queue_depth, figures.images, figures.ready) == (0, 0, 0)


def test_figures_absent_when_not_exported() -> None:
    figures = parse_figures("# TYPE other gauge\nother 1\n")
    assert (figures.queue_depth, figures.images, figures.ready) == (None, None, None)


def test_a_refused_key_file_reaches_the_figures(tmp_path: Path) -> None:
    """sdserve's own metrics (not a copy of their names): a reload that would leave no keys keeps
    them, and `sdnode status` reads that as stale keys, an unhealthy instance with a note."""
    from sdserve.keys import KeyStore, key_line
    from sdserve.metrics import Metrics

    path = tmp_path / "api-keys"
    path.write_text(key_line("a" * 32, "alice") + "\n" + key_line("b" * 32, "bob") + "\n")
    keys, metrics = KeyStore(path), Metrics(max_batch=4)
    metrics.watch_keys(keys)
    figures = parse_figures(generate_latest(metrics.registry).decode())
    assert (figures.keys, figures.keys_stale) == (2, 0)
    path.write_text("# emptied by mistake\n")
    assert keys.reload() is False
    figures = parse_figures(generate_latest(metrics.registry).decode())
    assert (figures.keys, figures.keys_stale) == (2, 1)
    url = "http://127.0.0.1:7860"
    assert not InstanceStatus(0, 7860, url, service="active", ready="yes", keys="stale").healthy
    assert InstanceStatus(0, 7860, url, service="active", ready="yes", keys="2").healthy


def test_metrics_that_are_not_prometheus_text_raise() -> None:
    with pytest.raises(ValueError):
        parse_figures("<html>502 Bad Gateway</html>\n")


@pytest.mark.parametrize("value, text", [(None, "-"), (3.0, "3"), (0.0, "0"), (2.25, "2.2")])
def test_fmt_number(value: float | None, text: str) -> None:
    assert fmt_number(value) == text


# ---------------------------------------------------------------------------------------------
# manifests

MANIFEST = {
    "accelerator": "nvidia",
    "driver": "550.127.05",
    "host": "gpu1",
    "kernel": "6.1.0-27-amd64",
    "kit_version": "0.1.0",
    "model": {
        "id": "sd15",
        "revision": "abc123",
        "checksums_sha256": "f" * 64,
        "path": "/var/lib/sdserve/models/sd15",
    },
    "instances": [
        {"name": "sdserve@0", "index": 0, "port": 7860, "url": "http://127.0.0.1:7860"},
        {"name": "sdserve@1", "index": 1, "port": 7861, "url": "http://127.0.0.1:7861"},
    ],
    "listen": "127.0.0.1",
    "release_id": "r-0001",
    "service": {"versions": {"torch": "2.13.0", "diffusers": "0.36.0"}, "built_at": "2026-11-29T01:00:00Z"},
}


def changed(**updates: object) -> dict:
    import copy

    manifest = copy.deepcopy(MANIFEST)
    for dotted, value in updates.items():
        target = manifest
        *parents, leaf = dotted.split("__")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return manifest


def test_identical_manifests_of_different_hosts() -> None:
    diff = diff_manifests(
        {"gpu1": MANIFEST, "gpu2": changed(host="gpu2", service__built_at="2026-11-30T00:00:00Z")}
    )
    assert diff.identical
    assert "host" in diff.ignored and "service.built_at" in diff.ignored
    assert diff.compared == len(flatten(MANIFEST)) - 2


def test_one_changed_field_is_the_only_row() -> None:
    diff = diff_manifests({"gpu1": MANIFEST, "gpu2": changed(model__checksums_sha256="0" * 64)})
    assert not diff.identical
    assert diff.rows == [("model.checksums_sha256", ["f" * 64, "0" * 64])]


def test_rows_put_what_decides_the_image_first() -> None:
    other = changed(
        kernel="6.1.0-28-amd64", driver="550.144.03", service__versions__torch="2.14.0", release_id="r-0002"
    )
    keys = [k for k, _ in diff_manifests({"a": MANIFEST, "b": other}).rows]
    assert keys == ["release_id", "driver", "service.versions.torch", "kernel"]


def test_a_key_on_one_side_only_differs() -> None:
    other = changed()
    del other["driver"]
    assert diff_manifests({"a": MANIFEST, "b": other}).rows == [("driver", ["550.127.05", MISSING])]


def test_no_ignore_compares_hosts_too() -> None:
    diff = diff_manifests({"gpu1": MANIFEST, "gpu2": changed(host="gpu2")}, ignore=())
    assert diff.rows == [("host", ["gpu1", "gpu2"])]


def test_flatten_lists_and_scalars() -> None:
    assert flatten({"a": [1, 2], "b": [{"c": None}], "d": {}, "e": True}) == {
        "a": "[1, 2]",
        "b[0].c": "null",
        "d": "{}",
        "e": "true",
    }


# ---------------------------------------------------------------------------------------------
# grid


@pytest.mark.parametrize(
    "count, shape",
    [(1, (1, 1)), (2, (2, 1)), (3, (2, 2)), (4, (2, 2)), (5, (3, 2)), (8, (3, 3)), (10, (4, 3))],
)
def test_grid_shape(count: int, shape: tuple[int, int]) -> None:
    columns, rows = grid_shape(count)
    assert (columns, rows) == shape
    assert columns * rows >= count and columns * (rows - 1) < count


def test_grid_shape_refuses_nothing() -> None:
    with pytest.raises(ValueError):
        grid_shape(0)


def test_grid_places_each_tile_and_its_caption() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    tiles = [
        ((f"n{i}", "instance 0, seed 42, 1.0s"), Image.new("RGB", (128, 128), c))
        for i, c in enumerate(colours)
    ]
    sheet = make_grid([*tiles, (("n9", "instance 0, FAILED, 0.0s"), None)])
    side = 2 * 128  # 128 px images doubled: whole factors up to MIN_TILE
    cell = (side + PAD, side + LABEL_HEIGHT + PAD)
    assert sheet.size == (PAD + 2 * cell[0], PAD + 2 * cell[1])
    for index, colour in enumerate(colours):
        x, y = tile_origin(index, 2, cell)
        assert (
            sheet.getpixel((x + 1, y + 1)) == colour
            and sheet.getpixel((x + side - 1, y + side - 1)) == colour
        )
        # Both caption lines were drawn (text pixels differ from the background).
        for line in range(2):
            top = y + side + 2 + line * LABEL_HEIGHT // 2
            strip = sheet.crop((x, top, x + side, top + LABEL_HEIGHT // 2 - 2))
            assert len(strip.getcolors(maxcolors=1 << 16)) > 1, (index, line)
    x, y = tile_origin(3, 2, cell)
    assert sheet.getpixel((x + 4, y + 4)) == (24, 24, 24)  # failed instance: a dark tile...
    failed = sheet.crop((x, y, x + side, y + side))
    assert len(failed.getcolors(maxcolors=1 << 16)) > 1  # ...marked FAILED


def test_grid_blows_tiny_images_up_sharp() -> None:
    checker = Image.new("RGB", (64, 64), (0, 0, 0))
    checker.putpixel((0, 0), (255, 255, 255))
    sheet = make_grid([(("a-very-long-node-name-that-does-not-fit", "instance 0"), checker)])
    assert sheet.size == (PAD + MIN_TILE + PAD, PAD + MIN_TILE + LABEL_HEIGHT + PAD)
    factor = MIN_TILE // 64
    assert sheet.getpixel((PAD + factor - 1, PAD + factor - 1)) == (255, 255, 255)
    assert sheet.getpixel((PAD + factor, PAD + factor)) == (0, 0, 0)


def test_caption_names_node_instance_seed_and_seconds() -> None:
    ok = SmokeResult("gpu1", 3, 42, True, 12.34, "/s/gpu1-3.png")
    assert (ok.label, ok.caption()) == ("gpu1-3", ("gpu1", "instance 3, seed 42, 12.3s"))
    down = SmokeResult("gpu2", None, 42, False, 0.0, "cannot reach")
    assert (down.label, down.caption()) == ("gpu2-?", ("gpu2", "instance ?, FAILED, 0.0s"))


# ---------------------------------------------------------------------------------------------
# keys


def test_generated_pair_is_private_loadable_and_matching(tmp_path: Path) -> None:
    private = tmp_path / "keys" / "sdnode_ed25519"
    public, line = generate_key_pair(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert public.read_text() == line + "\n"
    key = paramiko.Ed25519Key.from_private_key_file(str(private))
    assert line.split()[:2] == [key.get_name(), key.get_base64()]
    assert read_public_key(private) == line
    # OpenSSH agrees on the public half.
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=True
    )
    assert derived.stdout.split()[:2] == line.split()[:2]


def test_existing_pair_is_kept_without_force(tmp_path: Path) -> None:
    private = tmp_path / "sdnode_ed25519"
    _, first = generate_key_pair(private)
    with pytest.raises(Day2Error, match="--force"):
        generate_key_pair(private)
    assert read_public_key(private) == first
    _, second = generate_key_pair(private, force=True)
    assert second != first and read_public_key(private) == second


def test_missing_public_key_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(Day2Error, match="sdnode keys"):
        read_public_key(tmp_path / "sdnode_ed25519")


# ---------------------------------------------------------------------------------------------
# authorized_keys (the script bootstrap runs on the node, run here against a scratch HOME)


def run_script(home: Path, line: str) -> str:
    return subprocess.run(
        ["sh", "-c", authorized_keys_script(line)],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_authorized_keys_added_once_and_private(tmp_path: Path) -> None:
    line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey sdnode-fleet"
    ssh = tmp_path / ".ssh"
    ssh.mkdir(mode=0o755)
    (ssh / "authorized_keys").write_text("ssh-rsa AAAAB3other admin")  # no final newline
    assert run_script(tmp_path, line) == "added"
    assert run_script(tmp_path, line) == "present"
    assert (ssh / "authorized_keys").read_text() == f"ssh-rsa AAAAB3other admin\n{line}\n"
    assert stat.S_IMODE(ssh.stat().st_mode) == 0o700
    assert stat.S_IMODE((ssh / "authorized_keys").stat().st_mode) == 0o600


def test_authorized_keys_created_when_absent(tmp_path: Path) -> None:
    assert run_script(tmp_path, "ssh-ed25519 AAAA k") == "added"
    assert (tmp_path / ".ssh" / "authorized_keys").read_text() == "ssh-ed25519 AAAA k\n"


# ---------------------------------------------------------------------------------------------
# smoke answers


def png_b64(size: tuple[int, int], fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_decode_png_checks_format_and_size() -> None:
    raw, image = decode_png({"data": [{"b64_json": png_b64((64, 48))}]}, (64, 48))
    assert raw.startswith(b"\x89PNG") and image.size == (64, 48)
    with pytest.raises(ValueError, match="asked for 64x64"):
        decode_png({"data": [{"b64_json": png_b64((64, 48))}]}, (64, 64))
    with pytest.raises(ValueError, match="JPEG"):
        decode_png({"data": [{"b64_json": png_b64((64, 64), "JPEG")}]}, None)
    with pytest.raises(ValueError, match="b64_json"):
        decode_png({"data": []}, None)


def test_image_to_image_redraws_the_first_answer_with_its_settings() -> None:
    png = base64.b64decode(png_b64((64, 48)))
    body = img2img_body(request_body("p", 3, "64x48", 4), png)
    assert body == {
        "prompt": "p",
        "init_images": [base64.b64encode(png).decode()],
        "denoising_strength": 0.5,
        "seed": 3,
        "batch_size": 1,
        "width": 64,
        "height": 48,
        "steps": 4,
    }
    assert "width" not in img2img_body(request_body("p", 3, None, None), png)  # the service's default
    raw, image = decode_png({"images": [png_b64((64, 48))]}, (64, 48))  # A1111's answer
    assert raw == png and image.size == (64, 48)


def test_request_body_leaves_defaults_to_the_service() -> None:
    assert request_body("p", 1, None, None) == {
        "prompt": "p",
        "n": 1,
        "response_format": "b64_json",
        "seed": 1,
    }
    assert request_body("p", 1, "64x64", 4)["size"] == "64x64"


@pytest.mark.parametrize("text", ["64", "64x", "x64", "0x64", "64x64x2", "big"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(Day2Error, match="size must look like 512x512"):
        parse_size(text)


SMOKE_VARS = {"sdnode_accelerator": "cpu", "sdnode_smoke_width": 64, "sdnode_smoke_height": 64}


def test_smoke_request_takes_the_hosts_sdnode_smoke_vars() -> None:
    """inventory.local's tiny model: 64x64 in 4 steps; seed and prompt from the host when set."""
    node = node_from_vars("t1", {**SMOKE_VARS, "sdnode_smoke_steps": "4", "sdnode_smoke_seed": 7})
    body = node_request(node, None, None, None, None)
    assert (body["size"], body["steps"], body["seed"]) == ("64x64", 4, 7)
    node = node_from_vars("t1", {**SMOKE_VARS, "sdnode_smoke_prompt": "a red cube"})
    assert node_request(node, None, None, None, None)["prompt"] == "a red cube"


def test_smoke_request_flags_win_over_the_inventory() -> None:
    node = node_from_vars("t1", {**SMOKE_VARS, "sdnode_smoke_steps": 4, "sdnode_smoke_seed": 7})
    body = node_request(node, "p", 5, "128x96", 2)
    assert (body["prompt"], body["seed"], body["size"], body["steps"]) == ("p", 5, "128x96", 2)


def test_smoke_request_without_settings_leaves_size_and_steps_to_the_service() -> None:
    body = node_request(node_from_vars("t1", {"sdnode_accelerator": "cpu"}), None, None, None, None)
    assert "size" not in body and "steps" not in body and body["seed"] == 42


@pytest.mark.parametrize(
    "hostvars, flags, message",
    [
        ({"sdnode_smoke_width": 64}, {}, "sdnode_smoke_width and sdnode_smoke_height together"),
        ({"sdnode_smoke_steps": "many"}, {}, "sdnode_smoke_steps must be an integer"),
        ({"sdnode_smoke_width": 0, "sdnode_smoke_height": 64}, {}, "size must look like 512x512"),
        ({}, {"steps": 0}, "steps must be at least 1"),
        ({}, {"size": "huge"}, "size must look like 512x512"),
    ],
)
def test_bad_smoke_settings_name_the_host(hostvars: dict, flags: dict, message: str) -> None:
    node = node_from_vars("t1", {"sdnode_accelerator": "cpu", **hostvars})
    with pytest.raises(Day2Error, match=message) as err:
        node_request(node, None, None, flags.get("size"), flags.get("steps"))
    assert str(err.value).startswith("host t1: ")


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"detail": "steps: above max_steps (150)"}', "HTTP 422: steps: above max_steps (150)"),
        ('{"error": {"message": "invalid API key", "type": "auth"}}', "HTTP 401: invalid API key"),
        ("upstream down", "HTTP 502: upstream down"),
    ],
)
def test_error_detail_uses_the_service_message(body: str, message: str) -> None:
    assert error_detail(int(message[5:8]), body) == message


# ---------------------------------------------------------------------------------------------
# node facts


def test_driver_and_gpu_count() -> None:
    assert parse_driver("550.127.05\n550.127.05\n") == ("550.127.05", 2)
    assert parse_driver("") == ("-", 0)


def test_model_label_from_manifest() -> None:
    assert model_label(MANIFEST) == "sd15@abc123"
    assert model_label({}) == "-" and model_label(None) == "-"


# ---------------------------------------------------------------------------------------------
# instances from the manifest


def test_instances_and_endpoints_come_from_the_manifest() -> None:
    assert manifest_instances("gpu1", MANIFEST) == [
        Instance("sdserve@0", 0, 7860, "http://127.0.0.1:7860"),
        Instance("sdserve@1", 1, 7861, "http://127.0.0.1:7861"),
    ]


def test_an_ipv6_endpoint_is_taken_as_recorded() -> None:
    """The node computed it (listening on ::): brackets and all, nothing re-derived from the inventory."""
    six = changed(instances=[{"name": "sdserve@2", "index": 2, "port": 9002, "url": "http://[::1]:9002"}])
    assert manifest_instances("gpu1", six) == [Instance("sdserve@2", 2, 9002, "http://[::1]:9002")]


@pytest.mark.parametrize(
    "instances, message",
    [
        (["sdserve@0", "sdserve@1"], "old format"),
        (None, "records no instances"),
        ([], "records no instances"),
        ([{"name": "sdserve@0", "index": 0, "port": 7860}], "without name, index, port or url"),
    ],
)
def test_a_manifest_without_endpoints_says_to_deploy(instances: object, message: str) -> None:
    with pytest.raises(Day2Error, match=message) as err:
        manifest_instances("gpu1", changed(instances=instances))
    text = str(err.value)
    assert text.startswith("gpu1: /etc/sdserve/manifest.json") and "(make deploy)" in text
    assert "\n" not in text


# ---------------------------------------------------------------------------------------------
# the API key


def write_key(state: Path, name: str, key: str) -> None:
    (state / "api-keys").mkdir(parents=True, exist_ok=True)
    (state / "api-keys" / name).write_text(key + "\n")


def test_api_key_from_the_inventory_comes_first(tmp_path: Path) -> None:
    """sd_service_api_keys (as ansible-inventory gives a Vault-encrypted vars file: decrypted) wins over
    any generated key file; its first entry, as the deploy installs them."""
    write_key(tmp_path, "n1.default.key", "generated-key-000000")
    given = [{"name": "ops", "key": "vault-key-1111111111"}, {"name": "ci", "key": "vault-key-2222222222"}]
    assert api_key(tmp_path, "n1", {"sd_service_api_keys": given}) == "vault-key-1111111111"


def test_generated_key_is_the_first_generated_name_not_the_first_file(tmp_path: Path) -> None:
    write_key(tmp_path, "n1.aaa.key", "alphabetically-first-0")
    write_key(tmp_path, "n1.default.key", "role-default-name-000")
    write_key(tmp_path, "n1.ops.key", "first-configured-name")
    write_key(tmp_path, "n2.default.key", "another-hosts-key-000")
    assert api_key(tmp_path, "n1", {}) == "role-default-name-000"  # the role's default: [default]
    assert api_key(tmp_path, "n1", {"sd_service_generated_keys": ["ops", "aaa"]}) == "first-configured-name"


def test_no_key_names_both_ways_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(Day2Error) as err:
        api_key(tmp_path, "n1", {"sd_service_generated_keys": ["ops"]})
    text = str(err.value)
    assert text.startswith("n1: no API key") and "sd_service_api_keys" in text and "make deploy" in text
    assert str(tmp_path / "api-keys" / "n1.ops.key") in text


@pytest.mark.parametrize(
    "keys, message",
    [
        ([{"name": "ops", "key": {"__ansible_vault": "$ANSIBLE_VAULT;1.1;AES256\n3030"}}], "inline !vault"),
        ([{"name": "ops", "key": "{{ vault_sdserve_ops_key }}"}], "Jinja template"),
        ([{"name": "ops"}], "first entry of sd_service_api_keys has no key"),
        ("ops", "first entry of sd_service_api_keys has no key"),
    ],
)
def test_inventory_keys_sdnode_cannot_use_are_named(tmp_path: Path, keys: object, message: str) -> None:
    write_key(tmp_path, "n1.default.key", "generated-key-000000")  # never a silent fallback
    with pytest.raises(Day2Error, match=message) as err:
        api_key(tmp_path, "n1", {"sd_service_api_keys": keys})
    assert "n1" in str(err.value) and "sd_service_api_keys" in str(err.value)


@pytest.mark.parametrize(
    "since, arg",
    [
        ("1h", "1h ago"),
        ("30min", "30min ago"),
        ("2 days", "2 days ago"),
        ("2026-11-29 01:00", "2026-11-29 01:00"),
        ("today", "today"),
    ],
)
def test_journal_since(since: str, arg: str) -> None:
    assert journal_since(since) == arg


def test_journal_command_quotes_the_unit_glob() -> None:
    expected = "journalctl --no-pager --quiet -o short-iso -u 'sdserve@*' --since '1h ago'"
    assert journal_command("1h") == expected
