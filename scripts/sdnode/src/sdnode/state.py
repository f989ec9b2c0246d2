"""Where the controller keeps its state and caches.

State (keys, known_hosts, generated inventories) lives in `.sdnode/` at the repository root, or wherever
`SDNODE_STATE_DIR` points. Caches that should outlive a clone live in `/var/cache/sdnode`
(`SDNODE_CACHE_DIR` overrides, for tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

STATE_ENV = "SDNODE_STATE_DIR"
CACHE_ENV = "SDNODE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("/var/cache/sdnode")
# A directory holding this file is the repository root.
_ROOT_MARKER = Path("scripts") / "sdnode" / "src" / "sdnode"


def find_repo_root(start: Path | None = None) -> Path | None:
    """The nearest directory at or above `start` (default: cwd) that holds the sdnode repository."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / _ROOT_MARKER).is_dir():
            return candidate
    # Installed editable from a checkout: the package itself sits in <root>/<_ROOT_MARKER>.
    pkg_root = Path(__file__).resolve().parents[len(_ROOT_MARKER.parts)]
    if (pkg_root / _ROOT_MARKER).is_dir():
        return pkg_root
    return None


def state_dir(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The controller state directory (absolute; not created here)."""
    override = (os.environ if env is None else env).get(STATE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    root = find_repo_root(cwd)
    if root is None:
        raise RuntimeError(
            f"cannot find the sdnode repository above {cwd or Path.cwd()}; run from the checkout "
            f"or set {STATE_ENV}"
        )
    return root / ".sdnode"


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    override = (os.environ if env is None else env).get(CACHE_ENV)
    return Path(override).expanduser().resolve() if override else DEFAULT_CACHE_DIR
