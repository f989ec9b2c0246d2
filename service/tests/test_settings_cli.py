"""Settings, key file, command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from sdserve.keys import KeyFileError, KeyStore, hash_key, key_line, parse_key_file
from sdserve.settings import Settings, default_cache_dir

README = Path(__file__).resolve().parents[1] / "README.md"
ARCHITECTURE_NAMES = [
    "MODEL",
    "MODEL_ID",
    "MODEL_REVISION",
    "HOST",
    "PORT",
    "DEVICE",
    "DTYPE",
    "API_KEYS_FILE",
    "METRICS_PUBLIC",
    "MAX_BATCH",
    "QUEUE_SIZE",
    "BATCH_WAIT_MS",
    "REQUEST_TIMEOUT_S",
    "OUTPUT_DIR",
    "LOG_PROMPTS",
    "SAFETY_CHECKER",
    "COMPILE",
    "WARMUP_SIZES",
    "MAX_PIXELS",
    "MAX_STEPS",
    "JOB_TTL_S",
]


def sdserve(*args, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdserve", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_architecture_names_are_settings_and_documented():
    documented = set(re.findall(r"`SDSERVE_([A-Z_]+)`", README.read_text()))
    fields = {n.upper() for n in Settings.model_fields}
    assert set(ARCHITECTURE_NAMES) <= fields
    assert fields == documented, fields ^ documented


def test_env_prefix(monkeypatch):
    monkeypatch.setenv("SDSERVE_MAX_BATCH", "3")
    monkeypatch.setenv("SDSERVE_METRICS_PUBLIC", "true")
    monkeypatch.setenv("SDSERVE_WARMUP_SIZES", "512x512, 768x512")
    s = Settings()
    assert s.max_batch == 3 and s.metrics_public and s.warmup_size_list() == [(512, 512), (768, 512)]


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_BATCH", "0"), ("DTYPE", "float8"), ("WARMUP_SIZES", "500x512"), ("PORT", "http")],
)
def test_invalid_setting_named(monkeypatch, name, value):
    monkeypatch.setenv(f"SDSERVE_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_cache_dir_defaults(monkeypatch):
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/sdserve")
    assert default_cache_dir() == Path("/var/cache/sdserve")
    monkeypatch.delenv("CACHE_DIRECTORY")
    assert not str(default_cache_dir()).startswith(os.path.expanduser("~"))


def test_caches_and_offline_mode_forced(tmp_path, tiny_model):
    code = "import os; from sdserve.settings import *; point_caches_at(Settings().cache_dir); print(os.environ['HF_HOME'], os.environ['HF_HUB_OFFLINE'], os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    owned = ("HF_HOME", "HF_HUB_OFFLINE", "TORCHINDUCTOR_CACHE_DIR", "SDSERVE_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if k not in owned}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "CACHE_DIRECTORY": str(tmp_path)},
        check=True,
    )
    assert out.stdout.split() == [str(tmp_path / "huggingface"), "1", str(tmp_path / "torchinductor")]


def test_loopback_detection():
    assert Settings(host="127.0.0.1").host_is_loopback() and Settings(host="::1").host_is_loopback()
    assert Settings(host="localhost").host_is_loopback()
    assert (
        not Settings(host="0.0.0.0").host_is_loopback() and not Settings(host="10.0.0.5").host_is_loopback()
    )


def test_key_file_format(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\n{key_line('a' * 32, 'alice')}\n  {key_line('b' * 32, 'bob')}  \n")
    store = KeyStore(path)
    assert len(store) == 2 and store.lookup("a" * 32) == "alice" and store.lookup("b" * 32) == "bob"
    assert store.lookup("c" * 32) is None
    assert hash_key("x").startswith("sha256:") and len(hash_key("x")) == 71
    path.write_text(f"{key_line('a' * 32, 'alice')}\nsha256:zz bob\n")
    with pytest.raises(KeyFileError, match=r"keys:2: expected"):
        parse_key_file(path)
    path.write_text(f"{key_line('a' * 32, 'x')}\n{key_line('b' * 32, 'x')}\n")
    with pytest.raises(KeyFileError, match="appears twice"):
        parse_key_file(path)


def test_cli_hash_key():
    r = sdserve("hash-key", "--name", "alice", stdin="0123456789abcdef0123\n")
    assert r.returncode == 0 and r.stdout.strip() == key_line("0123456789abcdef0123", "alice")
    assert sdserve("hash-key", stdin="short\n").returncode == 2


def test_cli_check_and_info(tiny_model):
    r = sdserve("check", "--model", str(tiny_model), "--steps", "2", "--json", "--torch-threads", "1")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert (
        result["ok"] and result["device"] == "cpu" and result["dtype"] == "float32" and result["seconds"] > 0
    )
    assert "torchvision" not in r.stderr, r.stderr  # library notices that ask nothing of an operator
    bad = sdserve("check", "--model", str(tiny_model / "nope"))
    assert bad.returncode == 1 and "not a directory" in bad.stderr
    info = json.loads(sdserve("info", "--model", str(tiny_model), "--json").stdout)
    assert info["torch"] and info["diffusers"] and info["model"]["id"] == "tiny-sd"
    assert info["model"]["pipeline"] == "StableDiffusionPipeline" and "cuda" in info


def test_corrupt_model_fails_start_up_with_the_file_named(tiny_model, tmp_path):
    import shutil

    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = sdserve("serve", "--model", str(broken), "--port", "0", "--torch-threads", "1")
    assert r.returncode == 1
    assert (
        "start-up failed: cannot load the model" in r.stderr
        and "unet/diffusion_pytorch_model.safetensors" in r.stderr
    )
    assert "torchvision" not in r.stdout  # the deliberate absence is not reported at every start


def test_cli_serve_refusals(tiny_model, tmp_path):
    r = sdserve("serve", "--model", str(tiny_model), "--host", "0.0.0.0")
    assert r.returncode == 2 and "sdserve hash-key" in r.stderr and "SDSERVE_API_KEYS_FILE" in r.stderr
    r = sdserve("serve", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = sdserve("serve", "--model", str(tiny_model), env={"SDSERVE_QUEUE_SIZE": "0"})
    assert r.returncode == 2 and "SDSERVE_QUEUE_SIZE" in r.stderr
    (tmp_path / "keys").write_text("garbage\n")
    r = sdserve("serve", "--model", str(tiny_model), "--api-keys-file", str(tmp_path / "keys"))
    assert r.returncode == 2 and "keys:1" in r.stderr


def test_a_misspelt_setting_is_refused_with_the_closest_name(tiny_model):
    """pydantic-settings ignores unknown SDSERVE_* variables; a typo must not silently do nothing."""
    r = sdserve("info", "--model", str(tiny_model), env={"SDSERVE_MAX_BACTH": "4", "SDSERVE_NONSENSE": "1"})
    assert r.returncode == 2
    assert "SDSERVE_MAX_BACTH is not a setting (did you mean SDSERVE_MAX_BATCH?)" in r.stderr
    assert "SDSERVE_NONSENSE is not a setting" in r.stderr
    assert sdserve("info", "--model", str(tiny_model), env={"SDSERVE_MAX_BATCH": "4"}).returncode == 0
