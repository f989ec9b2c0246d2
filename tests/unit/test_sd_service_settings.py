"""sd_service's lists of the service's settings stay true to sdserve's Settings."""

from __future__ import annotations

from pathlib import Path

import yaml
from sdserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VARS = yaml.safe_load((ROOT / "roles" / "sd_service" / "vars" / "main.yml").read_text())


def test_every_setting_is_either_free_or_the_roles() -> None:
    free = set(VARS["__sd_service_free_settings"])
    managed = set(VARS["__sd_service_role_settings"])
    assert not free & managed
    assert free | managed == {name.upper() for name in Settings.model_fields}


def test_the_role_writes_what_it_claims_to_set() -> None:
    templates = "".join(
        (ROOT / "roles" / "sd_service" / "templates" / t).read_text()
        for t in ("sdserve.env.j2", "instance.env.j2")
    )
    written = {
        line.split("=", 1)[0].removeprefix("SDSERVE_")
        for line in templates.splitlines()
        if line.startswith("SDSERVE_") and "{{" not in line.split("=", 1)[0]  # not the free ones' loop
    }
    # CACHE_DIR follows systemd's CACHE_DIRECTORY (the unit's CacheDirectory=); no env file writes it.
    assert written == set(VARS["__sd_service_role_settings"]) - {"CACHE_DIR"}
