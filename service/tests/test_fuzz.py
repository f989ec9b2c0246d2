"""A bounded schemathesis run over both APIs, as `st run` runs it from the command line, against a
live server with keys and small limits: no 5xx, and every answer as the OpenAPI document says.

Every check runs but positive_data_acceptance: the document states each field's limits, but JSON
Schema cannot state the few rules across fields (the pixel budget across n and size, batch_size x
n_iter, a sampler's schedule types, eta with ancestral samplers), so a schema-valid body may still
rightly get a 422.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from sdserve.keys import key_line

KEY = "fuzz-0123456789abcdef0123456789abcdef"


def test_schemathesis_finds_no_5xx_and_no_mismatch(live, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text(key_line(KEY, "fuzz") + "\n")
    # Small limits keep each generation cheap; the document states them, so schemathesis keeps to them.
    server = live(api_keys_file=keys, output_dir=tmp_path / "out", max_side=128, max_steps=3,
                  max_images=2, max_pixels=2 * 128 * 128, default_steps=2, max_jobs=50)  # fmt: skip
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis' st is installed with the controller's tools (make setup)"
    command = [
        st, "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "-H", f"Authorization: Bearer {KEY}", "--max-examples", "15", "--seed", "20261202",
        "--generation-database", "none", "--workers", "1", "--request-timeout", "60", "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout[run.stdout.rfind("Test cases:") :]
    assert " passed" in summary and "failure" not in summary, summary[-2000:]
