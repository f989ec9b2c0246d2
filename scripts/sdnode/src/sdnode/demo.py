"""`make demo [OS=ubuntu-22.04|ubuntu-24.04]`: the kit's main job on one local throwaway node, CPU
mode, tiny model; Debian 12 unless OS names another release (one node per release).

Phases: node up -> tiny model -> site.yml -> sdnode smoke, each timed and shown as it runs. A second run
reuses the node (site.yml is idempotent, so it is quick). `--clean` removes the node.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdnode.localinv import build_inventory, venv_tool
from sdnode.state import find_repo_root, state_dir

# The demo node of each release testnode boots, and how the banner names it.
NODES = {"debian-12": "demo", "ubuntu-22.04": "demo-ub2204", "ubuntu-24.04": "demo-ub2404"}
TITLES = {"debian-12": "Debian 12", "ubuntu-22.04": "Ubuntu 22.04", "ubuntu-24.04": "Ubuntu 24.04"}


class Phases:
    """Prints a banner per phase and keeps its duration for the closing summary."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, title: str) -> Iterator[None]:
        print(f"\n==> [{len(self.timings) + 1}] {title}", flush=True)
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings.append((title, time.monotonic() - started))
            print(f"<== {title}: {self.timings[-1][1]:.1f}s", flush=True)


def set_up_seconds() -> float | None:
    """Time make spent on the demo's prerequisites before this started: the Makefile exports the
    moment it started as SDNODE_MAKE_STARTED (epoch seconds). None when run outside make."""
    try:
        return max(0.0, time.time() - float(os.environ["SDNODE_MAKE_STARTED"]))
    except (KeyError, ValueError):
        return None


def phases_after_setup() -> Phases:
    """The phases of a demo, opened with the set-up make's prerequisites took (when run from make)."""
    phases = Phases()
    setup = set_up_seconds()
    if setup is not None:
        phases.timings.append(("set-up: controller venv and host packages (make setup, host-setup)", setup))
    return phases


def run(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, cwd=cwd)
    if proc.returncode != 0:
        sys.exit(f"demo: `{' '.join(argv)}` failed with status {proc.returncode}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdnode-demo", description=__doc__)
    parser.add_argument("--clean", action="store_true", help="remove the demo node and its inventory")
    parser.add_argument(
        "--os", default="debian-12", choices=sorted(NODES), help="the node's release (default debian-12)"
    )
    args = parser.parse_args(argv)
    node = NODES[args.os]

    repo = find_repo_root()
    if repo is None:
        sys.exit("demo: run it from the sdnode checkout (make demo)")
    state = state_dir()
    inventory_dir = state / node / "inventory"
    if args.clean:
        run([venv_tool("testnode"), "down", node], repo)
        print(f"demo node {node} removed; controller state stays in {state}")
        return

    phases = phases_after_setup()
    with phases.phase(f"throwaway node '{node}' ({TITLES[args.os]}, systemd-nspawn)"):
        run([venv_tool("testnode"), "up", node, "--os", args.os], repo)
    with phases.phase("tiny random Stable Diffusion model on the controller"):
        model = state / "models" / "tiny"
        if (model / "model_index.json").exists():
            print(f"already built: {model}")
        else:
            run([venv_tool("sdserve"), "make-tiny-model", str(model)], repo)
    inventory = build_inventory(inventory_dir, [node], repo / "inventory.local" / "group_vars")
    with phases.phase("site.yml: base, driver (skipped: cpu node), python env, model, service"):
        run([venv_tool("ansible-playbook"), "-i", str(inventory), "playbooks/site.yml"], repo)
    with phases.phase("sdnode smoke: one generation per instance through the API"):
        run([venv_tool("sdnode"), "smoke", "-i", str(inventory)], repo)

    images = sorted((state / "smoke").glob(f"{node}-*.png"))
    manifest = state / "manifests" / f"{node}.json"
    print("\n==> demo done")
    for title, seconds in phases.timings:
        print(f"    {seconds:7.1f}s  {title}")
    print(f"    {sum(s for _, s in phases.timings):7.1f}s  in all")
    print(f"    sample image(s): {', '.join(map(str, images)) or 'none found (see smoke output)'}")
    print(f"    grid:            {state / 'smoke' / 'grid.png'}")
    print(f"    node manifest:   {manifest}{'' if manifest.exists() else ' (missing!)'}")
    print(f"    inventory:       {inventory / 'hosts.yml'}")
    print(f"    log in:          .venv/bin/testnode ssh {node}")
    print(f"    remove it:       make demo-clean{'' if args.os == 'debian-12' else ' OS=' + args.os}")
    if not images or not manifest.exists():
        sys.exit("demo: the run finished but the image or the manifest is missing")


if __name__ == "__main__":
    main()
