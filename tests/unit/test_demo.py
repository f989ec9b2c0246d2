"""The demos' own pieces that run without nodes: the phase timings they open with."""

from __future__ import annotations

import pytest
from sdnode.demo import phases_after_setup


def test_phases_open_with_the_setup_make_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("SDNODE_MAKE_STARTED", str(time.time() - 5))
    (title, seconds), *rest = phases_after_setup().timings
    assert "set-up" in title and 4 < seconds < 60 and not rest


def test_phases_without_make_have_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDNODE_MAKE_STARTED", raising=False)
    assert phases_after_setup().timings == []
