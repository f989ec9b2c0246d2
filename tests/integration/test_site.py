"""site.yml on a fresh Debian 12 node in CPU mode with the tiny model: converge, idempotence, verify."""

import subprocess
import time

import pytest
from PIL import Image

from .conftest import (
    STATE,
    Deployment,
    ansible_playbook,
    assert_converged,
    assert_idempotent,
    make_target,
    tool,
    verify,
)

pytestmark = pytest.mark.integration


def test_converge_reaches_every_role(deployed: Deployment) -> None:
    assert_converged(deployed.converge)
    # The first run on a fresh node must actually do the work, not skip its way to green.
    assert deployed.converge.changed >= 10, deployed.converge.explain()
    for role in ("base", "python_env", "model_cache", "sd_service"):
        assert f"TASK [{role} :" in deployed.converge.output, f"role {role} never ran"


def test_second_run_changes_nothing(deployed: Deployment) -> None:
    assert_idempotent(deployed.idempotence)


def test_check_mode_on_converged_node_reports_no_change(deployed: Deployment) -> None:
    run = ansible_playbook("site.yml", deployed.inventory, check=True, diff=True, label="site-check")
    assert_idempotent(run)


def test_verify_suite_passes_against_the_node(deployed: Deployment) -> None:
    verify(deployed.inventory)


def test_smoke_fetches_a_png_of_the_requested_size(deployed: Deployment) -> None:
    started = time.time()
    run = make_target("smoke", deployed.inventory, label="smoke")
    assert run.rc == 0, run.explain()
    images = [p for p in (STATE / "smoke").glob(f"{deployed.node}-*.png") if p.stat().st_mtime >= started]
    assert images, f"no smoke image written under {STATE / 'smoke'} by this run"
    with Image.open(images[0]) as img:
        img.load()
        assert img.format == "PNG" and img.size == (64, 64)  # inventory.local's sdnode_smoke_width/height
    grid = STATE / "smoke" / "grid.png"
    assert "grid: " in run.output and grid.stat().st_mtime >= started, run.explain()


def test_tool_paths_resolve() -> None:
    # Guards against a venv missing the console scripts the suite drives.
    for name in ("ansible-playbook", "testnode", "sdserve"):
        assert subprocess.run([tool(name), "--help"], capture_output=True).returncode == 0, name


def test_no_api_key_in_the_playbook_output(deployed: Deployment) -> None:
    keys = [p.read_text().strip() for p in (STATE / "api-keys").glob(f"{deployed.node}.*.key")]
    assert keys, f"no generated API key kept on the controller under {STATE / 'api-keys'}"
    for run in (deployed.converge, deployed.idempotence):
        for key in keys:
            assert key not in run.output, "an API key leaked into the playbook output"
