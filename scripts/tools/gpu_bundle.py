#!/usr/bin/env python3
"""Gather, hash-checked, the wheels the GPU checks need on a machine that has Python and a CUDA
build of torch but no network (the lent H200 machine: Python 3.12, torch 2.11+cu130).

Everything in the node's CUDA lock except torch and what torch brings with it (triton, the nvidia
and cuda wheels, sympy, networkx): the machine keeps its own CUDA torch, and the lock's
versions of the rest shadow the machine's through PYTHONPATH. Plus pytest-testinfra from the
controller lock for the gpu_runtime tier, and a wheel of sdserve itself.

    .venv/bin/python scripts/tools/gpu_bundle.py              # writes .gpu-bundle/ (git-ignored)
    bash scripts/tools/gpu_checks.sh .gpu-bundle "$OUT"      # on the GPU machine (see that script)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# torch stays the machine's own; these come with it, built for it.
TORCH_AND_ITS_OWN = r"torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|setuptools"
# On the machine already (its image's package list), and any recent version does; carrying them
# would pass the size limit (numpy alone is 16 MiB). hf-xet only speeds up downloads (offline there).
MACHINE_HAS = (
    "numpy|pillow|pyyaml|regex|jinja2|markupsafe|requests|urllib3|idna|charset-normalizer|certifi|"
    "psutil|packaging|filelock|fsspec|tqdm|typing-extensions|click|zipp|pygments|rich|markdown-it-py|"
    "mdurl|hf-xet"
)
KEEP_THE_MACHINES = re.compile(rf"^({TORCH_AND_ITS_OWN}|{MACHINE_HAS})$")
FROM_CONTROLLER_LOCK = ("pytest-testinfra",)


def _wheelhouse_module():
    """The python_env role's wheelhouse builder: one list of the platform tags a node accepts."""
    path = ROOT / "roles/python_env/files/build_wheelhouse.py"
    spec = importlib.util.spec_from_file_location("build_wheelhouse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PLATFORMS = _wheelhouse_module().PLATFORMS
LIMIT_MIB = 48  # the device tool carries 64 MiB with the working tree


def lock_entries(path: Path) -> dict[str, str]:
    """name -> its block ('name==version \\' and its --hash lines) from a uv/pip-compile lock."""
    entries: dict[str, str] = {}
    block: list[str] = []
    for line in [*path.read_text().splitlines(), ""]:
        if block and not line.startswith("    --hash"):
            name = re.split(r"[=\[ ]", block[0], maxsplit=1)[0].lower()
            entries[name] = "\n".join(block).rstrip(" \\")
            block = []
        if re.match(r"^[A-Za-z0-9]", line):
            block = [line]
        elif block and line.startswith("    --hash"):
            block.append(line)
    return entries


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    args = ap.parse_args()
    tag = args.python.replace(".", "")
    node_lock = lock_entries(ROOT / "service" / "requirements" / f"cuda-py{tag}.txt")
    controller_lock = lock_entries(ROOT / "ansible" / "requirements.txt")
    wanted = [block for name, block in node_lock.items() if not KEEP_THE_MACHINES.match(name)]
    wanted += [controller_lock[name] for name in FROM_CONTROLLER_LOCK]

    shutil.rmtree(args.out, ignore_errors=True)
    wheels = args.out / "wheels"
    wheels.mkdir(parents=True)
    requirements = args.out / "requirements.txt"
    requirements.write_text("\n".join(wanted) + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    download = [*pip, "download", "--require-hashes", "--no-deps", "--only-binary=:all:"]
    download += ["--python-version", args.python, "--implementation", "cp"]
    download += [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*download, "-d", str(wheels), "-r", str(requirements)], check=True)
    # The service wheel exactly as the python_env role builds it for a node.
    built = subprocess.run(
        [sys.executable, str(ROOT / "roles/python_env/files/build_service_wheel.py"), str(ROOT / "service"),
         str(args.out / "build")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    shutil.copy(json.loads(built.stdout)["path"], wheels)

    size = sum(f.stat().st_size for f in wheels.iterdir())
    count = len(list(wheels.iterdir()))
    print(f"gpu_bundle: {count} wheels, {size / 2**20:.1f} MiB in {wheels}")
    if size > LIMIT_MIB * 2**20:
        print(f"gpu_bundle: over {LIMIT_MIB} MiB, too large to carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
