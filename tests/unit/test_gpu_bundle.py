"""The GPU bundle's choice of wheels, read from the real locks (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "scripts" / "tools" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)


def chosen(python: str = "3.12") -> dict[str, str]:
    lock = gpu_bundle.lock_entries(
        ROOT / "service" / "requirements" / f"cuda-py{python.replace('.', '')}.txt"
    )
    return {n: b for n, b in lock.items() if not gpu_bundle.KEEP_THE_MACHINES.match(n)}


def test_every_lock_entry_is_pinned_with_hashes() -> None:
    lock = gpu_bundle.lock_entries(ROOT / "service" / "requirements" / "cuda-py312.txt")
    assert len(lock) > 50
    for name, block in lock.items():
        assert re.match(rf"^{re.escape(name)}==\S+ \\\n    --hash=sha256:[0-9a-f]{{64}}", block, re.I), block
        assert not block.endswith("\\"), block


def test_torch_and_its_cuda_wheels_stay_the_machines() -> None:
    names = set(chosen())
    assert not {n for n in names if n == "torch" or n == "triton" or n.startswith(("nvidia-", "cuda-"))}


def test_the_services_own_dependencies_travel_unless_the_machine_has_them() -> None:
    deps = tomllib.loads((ROOT / "service" / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    missing = {n for n in names - {"torch"} if n not in chosen() and not re.match(gpu_bundle.MACHINE_HAS, n)}
    assert not missing
    assert {"diffusers", "transformers", "fastapi", "uvicorn", "pydantic-settings"} <= set(chosen())
