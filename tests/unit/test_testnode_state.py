"""Where controller state and caches live."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdnode import state

REPO = Path(__file__).resolve().parents[2]


def test_state_dir_is_dot_sdnode_at_the_repo_root_from_any_subdirectory() -> None:
    assert state.state_dir(env={}, cwd=REPO) == REPO / ".sdnode"
    assert state.state_dir(env={}, cwd=REPO / "tests" / "unit") == REPO / ".sdnode"


def test_state_dir_override_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert state.state_dir(env={"SDNODE_STATE_DIR": "rel/state"}) == tmp_path / "rel" / "state"


def test_outside_the_repo_the_editable_install_still_finds_it(tmp_path: Path) -> None:
    # The package itself lives in <repo>/scripts/sdnode/src/sdnode.
    assert state.find_repo_root(tmp_path) == REPO


def test_cache_dir_default_and_override(tmp_path: Path) -> None:
    assert state.cache_dir(env={}) == Path("/var/cache/sdnode")
    assert state.cache_dir(env={"SDNODE_CACHE_DIR": str(tmp_path)}) == tmp_path
