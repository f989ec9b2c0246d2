#!/usr/bin/env python3
"""Regenerate the pinned, hash-checked requirement locks with `uv pip compile`.

Inputs: the service's dependencies (`service/pyproject.toml`) and, for the controller lock,
`ansible/requirements.in`. Outputs: `service/requirements/<flavour>-py<XY>.txt` and
`ansible/requirements.txt`. uv resolves from index metadata only, so no wheel is downloaded,
even for the multi-GB CUDA torch wheels.

    .venv/bin/python scripts/tools/lock_requirements.py            # every service lock
    .venv/bin/python scripts/tools/lock_requirements.py cpu-py311  # one lock
    .venv/bin/python scripts/tools/lock_requirements.py controller # ansible/requirements.txt
    .venv/bin/python scripts/tools/lock_requirements.py --check    # fail if a lock is stale (CI)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQ_DIR = ROOT / "service" / "requirements"
PYPROJECT = ROOT / "service" / "pyproject.toml"
TORCH_VERSION = "2.13.0"
# The last torch line with Python 3.10 wheels (2.15 dropped 3.10): Ubuntu 22.04's own python3.
TORCH_VERSION_PY310 = "2.14.1"
# glibc 2.28 or newer: Ubuntu 22.04 (2.35), Debian 12 (2.36), Ubuntu 24.04 (2.39).
PLATFORM = "x86_64-manylinux_2_28"
# The CPU torch build is published only on PyTorch's own index; here it comes from a local wheel.
DEFAULT_CPU_FIND_LINKS = "/opt/wheels"


@dataclass(frozen=True)
class Target:
    name: str
    python: str
    torch: str  # exact pin, passed as a constraint over the pyproject's range
    what: str


TARGETS = {
    t.name: t
    for t in (
        Target("cpu-py311", "3.11", f"torch=={TORCH_VERSION}+cpu", "CPU nodes, Debian 12"),
        Target("cuda-py311", "3.11", f"torch=={TORCH_VERSION}", "NVIDIA nodes, Debian 12"),
        # Ubuntu 22.04's python3 is 3.10 (its python3.11 is the 3.11.0rc1 pre-release, on which torch
        # fails to import): the newest stack with 3.10 wheels. No CPU torch for 3.10 can be reached
        # here, so CPU nodes on 22.04 install this CUDA lock too (torch's CPU kernels run without a GPU).
        Target("cuda-py310", "3.10", f"torch=={TORCH_VERSION_PY310}", "NVIDIA and CPU nodes, Ubuntu 22.04"),
        Target("cuda-py312", "3.12", f"torch=={TORCH_VERSION}", "NVIDIA and CPU nodes, Ubuntu 24.04"),
    )
}
CONTROLLER = "controller"
# Extras of the service installed on the nodes (uvloop and httptools: uvicorn's fast paths).
NODE_EXTRAS = ("fast",)


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        sys.exit("lock_requirements: uv not found; install it with: .venv/bin/pip install uv")
    return found


def compile_lock(
    inputs: list[Path],
    output: Path,
    python: str,
    constraints: list[str],
    find_links: list[str],
    index_url: str | None,
    command: str,
    constraint_files: tuple[Path, ...] = (),
    extras: tuple[str, ...] = (),
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfile = Path(tmp) / "constraints.txt"
        cfile.write_text("".join(f"{c}\n" for c in constraints))
        args = [
            uv(),
            "pip",
            "compile",
            *(str(i.relative_to(ROOT)) for i in inputs),
            "--constraint",
            str(cfile),
            *[a for f in constraint_files for a in ("--constraint", str(f.relative_to(ROOT)))],
            "--generate-hashes",
            "--python-version",
            python,
            "--python-platform",
            PLATFORM,
            "--output-file",
            str(output),
            "--custom-compile-command",
            command,
            "--no-emit-find-links",
            "--no-emit-index-url",
            *[a for extra in extras for a in ("--extra", extra)],
            # Keep pins stable across runs: only move a package when its constraints force it.
            "--upgrade" if os.environ.get("LOCK_UPGRADE") else "--quiet",
        ]
        for link in find_links:
            args += ["--find-links", link]
        if index_url:
            args += ["--index-url", index_url]
        env = dict(os.environ)
        # The machine's TLS proxy CA lives in the system bundle; uv's bundled roots don't know it.
        env.setdefault("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
        env["UV_NATIVE_TLS"] = "1"
        subprocess.run(args, check=True, cwd=ROOT, env=env)
        # The temporary constraints file's path lands in uv's "via" notes: name it stably instead.
        output.write_text(
            output.read_text().replace(str(cfile), "torch pin in scripts/tools/lock_requirements.py")
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help=f"locks to build: {', '.join(TARGETS)}, {CONTROLLER}")
    ap.add_argument(
        "--cpu-find-links",
        default=DEFAULT_CPU_FIND_LINKS,
        help="directory or URL holding torch+cpu wheels (field: https://download.pytorch.org/whl/cpu/torch/)",
    )
    ap.add_argument("--index-url", help="a PyPI mirror to resolve from instead of PyPI")
    ap.add_argument("--check", action="store_true", help="fail if a lock is stale")
    args = ap.parse_args()

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS and n != CONTROLLER]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {[*TARGETS, CONTROLLER]}")
    if not PYPROJECT.is_file():
        sys.exit(f"lock_requirements: {PYPROJECT} is missing")

    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == CONTROLLER:
                final = ROOT / "ansible" / "requirements.txt"
                inputs = [ROOT / "ansible" / "requirements.in"]
                # Agree with what CPU nodes run for every package both sides use.
                constraints, cfiles = [], (REQ_DIR / "cpu-py311.txt",)
                python, find_links = "3.11", [args.cpu_find_links]
            else:
                t = TARGETS[name]
                final = REQ_DIR / f"{name}.txt"
                inputs, constraints, python, cfiles = [PYPROJECT], [t.torch], t.python, ()
                find_links = [args.cpu_find_links] if name.startswith("cpu") else []
            out = Path(tmp) / final.name if args.check else final
            if args.check and final.exists():
                shutil.copy(final, out)  # start from the current pins, as a real run would
            command = f"scripts/tools/lock_requirements.py {name}"
            compile_lock(
                inputs,
                out,
                python,
                constraints,
                find_links,
                args.index_url,
                command,
                cfiles,
                () if name == CONTROLLER else NODE_EXTRAS,
            )
            if args.check and (not final.exists() or out.read_text() != final.read_text()):
                stale.append(name)
            print(
                f"lock_requirements: {name}: {final.relative_to(ROOT)}"
                f" ({sum(1 for line in out.read_text().splitlines() if '==' in line)} pins)"
            )
    if stale:
        print(f"lock_requirements: stale: {', '.join(stale)}; rerun this script", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
