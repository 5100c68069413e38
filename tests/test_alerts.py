"""The chart's PrometheusRule, rendered by a real helm, checked and unit-tested by a real
promtool: `promtool check rules` (syntax, templates) and `promtool test rules`
(tests/monitoring/alerts-test.yaml: each alert fires when it should and stays quiet when
it should not, including counters born with their first event before the first scrape)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from monitoring.tools import (
    ALERTS_TEST,
    alert_rules,
    exposition_names,
    promql_metric_names,
    rendered_rules,
    run,
    tool,
)
from prometheus_client import generate_latest

from modelcache.metrics import DAEMON_REGISTRY, OPERATOR_REGISTRY

REQUIRED = {
    "ModelCacheMetaTensorError",  # any meta-tensor error
    "ModelCacheModelLoadFailed",  # model load failures
    "ModelCacheNotReady",  # a ModelCache not Ready for N minutes
    "ModelCacheModelNotLoaded",
    "ModelCacheSlowModelLoad",  # load time over a threshold
    "ModelCacheResourceExhausted",  # RESOURCE_EXHAUSTED rate
    "ModelCacheQueueSaturated",  # daemon queue saturation
    "ModelCacheOperatorReconcileErrors",  # operator reconcile errors
}


def _promtool() -> str:
    return tool("promtool")


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = rendered_rules()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    out = run([_promtool(), "check", "rules", str(tmp_path / "rules.yaml")])
    n = len(alert_rules(rules))
    assert f"SUCCESS: {n} rules found" in out.stdout, out.stdout


def test_rules_unit_tests_pass(tmp_path: Path) -> None:
    rules = rendered_rules()
    # The unit tests compare summaries; the long runbook descriptions are checked by
    # `promtool check rules` above and by test_every_alert_has_a_runbook.
    for rule in alert_rules(rules):
        rule["annotations"].pop("description", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts-test.yaml")
    out = run([_promtool(), "test", "rules", str(tmp_path / "alerts-test.yaml")], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = {r["alert"] for r in alert_rules(rendered_rules())}
    assert names >= REQUIRED, REQUIRED - names
    assert names - firing == set(), f"alerts without a firing test case: {names - firing}"


def test_every_alert_has_a_runbook() -> None:
    for rule in alert_rules(rendered_rules()):
        ann, labels = rule["annotations"], rule["labels"]
        assert labels["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert ann.get("summary"), rule["alert"]
        assert "Runbook:" in ann.get("description", ""), rule["alert"]
        assert "runbook_url" not in ann  # only with monitoring.prometheusRule.runbookBaseUrl


def test_thresholds_and_labels_come_from_values() -> None:
    rules = rendered_rules(
        {
            "notReadyMinutes": 42,
            "loadSecondsThreshold": 1234,
            "resourceExhaustedRatio": 0.25,
            "queueDepthThreshold": 77,
            "runbookBaseUrl": "https://runbooks.example/modelcache",
            "alertLabels": {"team": "ml-platform"},
        }
    )
    by_name = {r["alert"]: r for r in alert_rules(rules)}
    assert by_name["ModelCacheNotReady"]["for"] == "42m"
    assert by_name["ModelCacheModelNotLoaded"]["for"] == "42m"
    assert "> 1234" in by_name["ModelCacheSlowModelLoad"]["expr"]
    assert "> 0.25" in by_name["ModelCacheResourceExhausted"]["expr"]
    assert "> 77" in by_name["ModelCacheQueueSaturated"]["expr"]
    for name, rule in by_name.items():
        assert rule["labels"]["team"] == "ml-platform"
        assert rule["annotations"]["runbook_url"] == (
            f"https://runbooks.example/modelcache#{name.lower()}"
        )


def test_alerts_use_only_exported_metrics() -> None:
    """Every metric an alert reads is one modelcache/metrics.py exports (absent() included)."""
    exported = exposition_names(
        generate_latest(DAEMON_REGISTRY).decode() + generate_latest(OPERATOR_REGISTRY).decode()
    )
    for rule in alert_rules(rendered_rules()):
        used = promql_metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']}: {used - exported} not exported"
