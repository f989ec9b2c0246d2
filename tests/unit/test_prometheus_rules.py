"""The sd_monitor role's Prometheus rules: promtool accepts every rule file, every promtool unit test
passes, and every alert has a case where it fires and one where it does not, so that a new alert
without a test fails the suite. promtool comes with Debian's `prometheus` package (`make host-setup`)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "roles" / "sd_monitor" / "files" / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.yml"))
SEVERITIES = {"page", "ticket"}
# level:metric:operations, as in the Prometheus docs' recording rule naming.
RECORD_NAME = re.compile(r"^[a-z_]+:[a-zA-Z0-9_]+:[a-z0-9_]+$")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("promtool is missing: run `make host-setup` (it installs Debian's prometheus package)")
    pytest.skip("promtool is missing: run `make host-setup` (Debian's prometheus package) to run these")


def _rules(kind: str) -> list[dict]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if kind in rule
    ]


def _tests() -> list[tuple[Path, dict]]:
    return [(path, case) for path in TEST_FILES for case in yaml.safe_load(path.read_text())["tests"]]


def test_there_are_rules_and_tests() -> None:
    assert RULE_FILES, f"no rule files in {PROMETHEUS / 'rules'}"
    assert TEST_FILES, f"no promtool test files in {PROMETHEUS / 'tests'}"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    proc = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(path: Path) -> None:
    # From the test file's directory, as its rule_files are relative to it.
    proc = subprocess.run(
        [_promtool(), "test", "rules", path.name], cwd=path.parent, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_rule_file_is_tested() -> None:
    tested = {
        (path.parent / name).resolve()
        for path in TEST_FILES
        for name in yaml.safe_load(path.read_text())["rule_files"]
    }
    assert not [p.name for p in RULE_FILES if p.resolve() not in tested]


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not() -> None:
    fires, quiet = set(), set()
    for _, case in _tests():
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules("alert")}
    assert alerts
    assert not sorted(alerts - fires), "alerts no test expects to fire"
    assert not sorted(alerts - quiet), "alerts no test expects to stay quiet"
    assert not sorted((fires | quiet) - alerts), "tests of alerts that do not exist"


def test_every_firing_case_checks_labels_and_annotations() -> None:
    for path, case in _tests():
        for check in case.get("alert_rule_test", []):
            for alert in check.get("exp_alerts") or []:
                where = f"{path.name}: {case.get('name')}: {check['alertname']} at {check['eval_time']}"
                assert alert.get("exp_labels", {}).get("severity") in SEVERITIES, where
                assert set(alert.get("exp_annotations", {})) == {"summary", "description"}, where


def test_every_recording_rule_has_its_value_tested() -> None:
    exprs = " ".join(t["expr"] for _, case in _tests() for t in case.get("promql_expr_test", []))
    untested = [rule["record"] for rule in _rules("record") if rule["record"] not in exprs]
    assert not untested


def test_recording_rules_are_named_level_metric_operations() -> None:
    assert not [rule["record"] for rule in _rules("record") if not RECORD_NAME.match(rule["record"])]


def test_every_alert_has_a_for_a_severity_and_a_runbook_hint() -> None:
    for rule in _rules("alert"):
        name = rule["alert"]
        assert re.fullmatch(r"[1-9][0-9]*m", rule.get("for", "")), f"{name}: a `for:` in minutes"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        assert re.search(r"`[^`]+`", annotations["description"]), f"{name}: a command to start with"
