"""The README stays true: its variables reference matches the roles' argument specs, every make
target it names exists, and every sdnode line it shows parses."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
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


TYPES = {"int": int, "bool": bool, "str": str, "path": str, "list": list, "dict": dict, "float": (int, float)}


@pytest.mark.parametrize(
    "role", ["base", "nvidia_driver", "python_env", "model_cache", "sd_service", "sd_monitor"]
)
def test_defaults_and_argument_specs_agree(role: str) -> None:
    """defaults/main.yml is the one source of a role's defaults; its argument spec types the same
    variables and repeats no default. A variable left undefined on purpose is shown commented out."""
    spec = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    defaults_text = (ROOT / "roles" / role / "defaults" / "main.yml").read_text()
    defaults = {k: v for k, v in (yaml.safe_load(defaults_text) or {}).items() if not k.startswith("__")}
    assert [name for name, opt in options.items() if "default" in opt] == [], (
        "defaults belong in defaults/main.yml"
    )
    assert sorted(set(defaults) - set(options)) == [], "defaults without an argument spec entry"
    for name, opt in options.items():
        if opt.get("required"):
            continue
        if name not in defaults:
            assert re.search(rf"^# {name}:", defaults_text, re.M), (
                f"{name}: no default, and not shown commented out"
            )
            continue
        value = defaults[name]
        if isinstance(value, str) and "{{" in value:
            continue  # computed at run time
        wanted = TYPES[opt.get("type", "str")]
        ok = isinstance(value, wanted) and not (
            isinstance(value, bool) and opt.get("type") in ("int", "float")
        )
        assert ok, f"{name}: default {value!r} is not a {opt.get('type', 'str')}"
        if "choices" in opt:  # of a list: each element
            chosen = value if isinstance(value, list) else [value]
            assert set(chosen) <= set(opt["choices"]), f"{name}: default {value!r} not among {opt['choices']}"
