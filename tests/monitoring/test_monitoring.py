"""Prometheus rules and the Grafana dashboard, checked with the real promtool."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run `bash tests/setup.sh` (installs Debian's prometheus)")
    return subprocess.run(
        [promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for g in groups for rule in g["rules"] if "alert" in rule]


def load_dashboard_builder() -> ModuleType:
    """The dashboard generator script, imported from its path."""
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", MONITORING / "grafana" / "build_dashboard.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _board() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(
        (MONITORING / "grafana" / "dashboards" / "fraudstream.json").read_text()
    )
    return board


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the committed dashboard (rows have none)."""
    return [(p["title"], t["expr"]) for p in _board()["panels"] for t in p.get("targets", [])]


def console_metric_names() -> set[str]:
    """The series names the console exports, from its one metrics module (with the
    ``_total``, ``_bucket``, ``_sum``, ``_count`` suffixes Prometheus sees)."""
    from prometheus_client import CollectorRegistry

    from stream_app.console.metrics import ConsoleMetrics

    registry = CollectorRegistry()
    ConsoleMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]
    }


def test_promtool_accepts_the_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fired == set(), "alerts without a test in which they fire"
    assert names - quiet == set(), "alerts without a test in which they stay quiet"


def test_every_alert_has_severity_summary_and_a_runbook_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)
    }
    for rule in _alerts():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in headings, f"README has no runbook section for {rule['alert']}"


def test_committed_dashboard_is_the_generated_one() -> None:
    builder = load_dashboard_builder()
    committed = (MONITORING / "grafana" / "dashboards" / "fraudstream.json").read_text()
    assert committed == builder.render(), "run python monitoring/grafana/build_dashboard.py"


def test_dashboard_covers_what_operators_watch() -> None:
    text = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "fraudstream_events_total",
        "fraudstream_end_to_end_latency_seconds_bucket",
        "fraudstream_alerts_total",
        "fraudstream_dead_letters_total",
        "fraudstream_score_bucket",
        "fraudstream_score_psi",
        "fraudstream_model_info",
        "fraudstream_consumer_lag",
        "fraudstream_redis_errors_total",
        "fraudstream_kafka_errors_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert metric in text, metric
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(fraudstream_end_to_end" in text


def test_the_console_row_shows_its_metrics_and_only_metrics_it_defines() -> None:
    panels = _board()["panels"]
    rows = [i for i, p in enumerate(panels) if p["type"] == "row"]
    assert [panels[i]["title"] for i in rows] == ["Review console"]
    below = panels[rows[0] + 1 :]
    assert all(p["gridPos"]["y"] > panels[rows[0]]["gridPos"]["y"] for p in below)
    exprs = [t["expr"] for p in below for t in p["targets"]]
    defined = console_metric_names()
    used = {name for expr in exprs for name in re.findall(r"fraudstream_console_\w+", expr)}
    assert used <= defined, f"not console metrics: {used - defined}"
    assert all('job="fraudstream-console"' in expr for expr in exprs)
    for metric in (
        "fraudstream_console_cases",
        "fraudstream_console_oldest_case_age_seconds",
        "fraudstream_console_sla_seconds",
        "fraudstream_console_verdicts_total",
        "fraudstream_console_time_to_verdict_seconds_bucket",
        "fraudstream_console_alerts_total",
        "fraudstream_console_labels_published_total",
    ):
        assert metric in used, metric
    text = " ".join(exprs)
    for q in ("0.5", "0.9"):
        assert f"histogram_quantile({q}, sum by (le) (rate(fraudstream_console_time_to" in text


def test_the_console_rules_use_metrics_the_console_defines() -> None:
    text = (MONITORING / "alerts.yml").read_text()
    used = set(re.findall(r"fraudstream_console_\w+", text))
    assert {
        "fraudstream_console_oldest_case_age_seconds",
        "fraudstream_console_sla_seconds",
    } <= used
    assert used <= console_metric_names(), used - console_metric_names()


def test_provisioning_points_grafana_at_the_dashboard_folder() -> None:
    provider = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "dashboards" / "fraudstream.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {p["datasource"]["uid"] for p in _board()["panels"] if p["type"] != "row"}
    assert uids == {datasource["datasources"][0]["uid"]}
