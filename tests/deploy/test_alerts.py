"""The Prometheus alert rules (`deploy/prometheus/alerts.yaml`), as Prometheus's own `promtool` reads
them: `promtool check rules` checks the file (YAML, PromQL, templates) and `promtool test rules` runs
its unit tests (`alerts.test.yaml`: input series, and the alerts expected to fire or stay silent at
given times). Without promtool the tests fail: `scripts/test` installs it (Debian's `prometheus`)."""

from __future__ import annotations

import subprocess

from tests.support.paths import ROOT
from tests.support.tools import required_tool

RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"


def promtool() -> str:
    return required_tool("promtool", "scripts/test installs it (apt-get install --no-install-recommends prometheus)")


def run_promtool(*args: str) -> None:
    result = subprocess.run([promtool(), *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}{result.stderr}"


def test_the_alert_rules_are_valid() -> None:
    run_promtool("check", "rules", str(RULES.relative_to(ROOT)))


def test_the_alert_rules_pass_their_unit_tests() -> None:
    """Healthy and bad deployments, a small absolute rise, low traffic, dropped predictions."""
    run_promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
