"""The README stays true: its variables reference matches the roles' argument specs, every make
target it names exists, and every sdnode line it shows parses."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from sdnode.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_role_variables_reference_matches_argument_specs() -> None:
    script = ROOT / "scripts" / "tools" / "gen_role_docs.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_role_variable_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for spec_file in sorted(ROOT.glob("roles/*/meta/argument_specs.yml")):
        options = yaml.safe_load(spec_file.read_text())["argument_specs"]["main"]["options"]
        missing = [name for name in options if f"`{name}`" not in readme]
        assert not missing, f"{spec_file.parent.parent.name}: {missing}"


def test_make_targets_named_in_the_readme_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    named = set(re.findall(r"`make ([a-z][a-z-]*)", readme))
    assert named, "the README names no make target"
    assert named <= defined, f"README names undefined targets: {sorted(named - defined)}"


def test_sdnode_lines_in_the_readme_parse() -> None:
    """Every `.venv/bin/sdnode ...` line the README shows is accepted by the command line as written."""
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.strip().startswith(".venv/bin/sdnode ")
    ]
    assert len(lines) >= 5, lines
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])  # argparse exits (fails the test) on a bad line
