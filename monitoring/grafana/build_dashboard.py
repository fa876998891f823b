"""Generates dashboards/fraudstream.json, the operators' Grafana dashboard.

Run ``python monitoring/grafana/build_dashboard.py`` after changing a panel; a test checks the
committed JSON equals this script's output, and another evaluates every panel's query against
a real Prometheus scraping a real worker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "fraudstream.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
JOB = 'job="fraudstream-worker"'
CONSOLE_JOB = 'job="fraudstream-console"'


def _quantile(q: float, metric: str, job: str = JOB, window: str = "1m") -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{job}}}[{window}])))"


# (title, unit, panel type, [(legend, PromQL)], width)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], int]] = [
    (
        "Throughput by outcome",
        "ops",
        "timeseries",
        [("{{outcome}}", f"sum by (outcome) (rate(fraudstream_events_total{{{JOB}}}[1m]))")],
        12,
    ),
    (
        "End-to-end latency (record created to score published)",
        "s",
        "timeseries",
        [
            ("p50", _quantile(0.5, "fraudstream_end_to_end_latency_seconds")),
            ("p95", _quantile(0.95, "fraudstream_end_to_end_latency_seconds")),
            ("p99", _quantile(0.99, "fraudstream_end_to_end_latency_seconds")),
        ],
        12,
    ),
    (
        "Alerts by decision",
        "ops",
        "timeseries",
        [("{{decision}}", f"sum by (decision) (rate(fraudstream_alerts_total{{{JOB}}}[1m]))")],
        8,
    ),
    (
        "Dead letters by reason",
        "ops",
        "timeseries",
        [("{{reason}}", f"sum by (reason) (rate(fraudstream_dead_letters_total{{{JOB}}}[5m]))")],
        8,
    ),
    (
        "Labels by outcome",
        "ops",
        "timeseries",
        [("{{outcome}}", f"sum by (outcome) (rate(fraudstream_labels_total{{{JOB}}}[5m]))")],
        8,
    ),
    (
        "Operator controls in force",
        "short",
        "timeseries",
        [("{{kind}}", f"max by (kind) (fraudstream_controls_in_force{{{JOB}}})")],
        12,
    ),
    (
        "Decisions set by block and allow lists",
        "ops",
        "timeseries",
        [("{{list}}", f"sum by (list) (rate(fraudstream_list_decisions_total{{{JOB}}}[5m]))")],
        12,
    ),
    (
        "Score distribution",
        "short",
        "heatmap",
        [("{{le}}", f"sum by (le) (increase(fraudstream_score_bucket{{{JOB}}}[1m]))")],
        12,
    ),
    (
        "Score drift (PSI against the model card's reference)",
        "short",
        "timeseries",
        [("{{instance}}", f"fraudstream_score_psi{{{JOB}}}")],
        12,
    ),
    (
        "Model version",
        "short",
        "table",
        [("", f"max by (version, role) (fraudstream_model_info{{{JOB}}})")],
        8,
    ),
    (
        "Consumer lag by partition",
        "short",
        "timeseries",
        [
            (
                "{{topic}}/{{partition}}",
                f"sum by (topic, partition) (fraudstream_consumer_lag{{{JOB}}})",
            )
        ],
        8,
    ),
    (
        "Time since last offset commit",
        "s",
        "timeseries",
        [("{{instance}}", f"time() - fraudstream_last_commit_timestamp_seconds{{{JOB}}}")],
        8,
    ),
    (
        "Redis and Kafka errors",
        "ops",
        "timeseries",
        [
            ("redis", f"sum(rate(fraudstream_redis_errors_total{{{JOB}}}[5m]))"),
            (
                "kafka {{operation}}",
                f"sum by (operation) (rate(fraudstream_kafka_errors_total{{{JOB}}}[5m]))",
            ),
        ],
        12,
    ),
    (
        "Stage time p99 (per micro-batch)",
        "s",
        "timeseries",
        [
            ("processing", _quantile(0.99, "fraudstream_processing_seconds")),
            ("inference", _quantile(0.99, "fraudstream_inference_seconds")),
            ("redis", _quantile(0.99, "fraudstream_redis_seconds")),
        ],
        12,
    ),
    (
        "Mean batch size",
        "short",
        "timeseries",
        [
            (
                "{{instance}}",
                f"rate(fraudstream_batch_size_sum{{{JOB}}}[1m])"
                f" / rate(fraudstream_batch_size_count{{{JOB}}}[1m])",
            )
        ],
        8,
    ),
    (
        "Worker CPU",
        "percentunit",
        "timeseries",
        [("{{instance}}", f"rate(process_cpu_seconds_total{{{JOB}}}[1m])")],
        8,
    ),
    (
        "Worker memory (RSS)",
        "bytes",
        "timeseries",
        [("{{instance}}", f"process_resident_memory_bytes{{{JOB}}}")],
        8,
    ),
]


# The review console's row. Every console replica reports the same queue (its gauges are read
# from the shared case store): gauges are combined with max, counters summed.
CONSOLE_ROW = "Review console"
CONSOLE_PANELS: list[tuple[str, str, str, list[tuple[str, str]], int]] = [
    (
        "Cases waiting for a verdict, by status",
        "short",
        "timeseries",
        [("{{status}}", f"max by (status) (fraudstream_console_cases{{{CONSOLE_JOB}}})")],
        8,
    ),
    (
        "Oldest waiting case against the SLA",
        "s",
        "timeseries",
        [
            ("oldest case", f"max(fraudstream_console_oldest_case_age_seconds{{{CONSOLE_JOB}}})"),
            ("SLA", f"max(fraudstream_console_sla_seconds{{{CONSOLE_JOB}}})"),
        ],
        8,
    ),
    (
        "Time to verdict (opening to closing verdict)",
        "s",
        "timeseries",
        [
            (
                "p50",
                _quantile(0.5, "fraudstream_console_time_to_verdict_seconds", CONSOLE_JOB, "1h"),
            ),
            (
                "p90",
                _quantile(0.9, "fraudstream_console_time_to_verdict_seconds", CONSOLE_JOB, "1h"),
            ),
        ],
        8,
    ),
    (
        "Verdicts per hour, by outcome",
        "short",
        "timeseries",
        [
            (
                "{{outcome}}",
                "sum by (outcome) "
                f"(increase(fraudstream_console_verdicts_total{{{CONSOLE_JOB}}}[1h]))",
            )
        ],
        8,
    ),
    (
        "Alerts read by the console, by outcome",
        "ops",
        "timeseries",
        [
            (
                "{{outcome}}",
                f"sum by (outcome) (rate(fraudstream_console_alerts_total{{{CONSOLE_JOB}}}[5m]))",
            )
        ],
        8,
    ),
    (
        "Labels published from verdicts, per hour",
        "short",
        "timeseries",
        [
            (
                "labels acknowledged",
                f"sum(increase(fraudstream_console_labels_published_total{{{CONSOLE_JOB}}}[1h]))",
            ),
            (
                "closing verdicts",
                "sum(increase(fraudstream_console_verdicts_total"
                f'{{{CONSOLE_JOB}, outcome=~"fraud|legitimate"}}[1h]))',
            ),
        ],
        8,
    ),
]


def _row(index: int, y: int, title: str) -> dict[str, Any]:
    """A row header: Grafana groups the panels below it under ``title``."""
    return {
        "id": index + 1,
        "title": title,
        "type": "row",
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def _panel(
    index: int, x: int, y: int, spec: tuple[str, str, str, list[tuple[str, str]], int]
) -> dict[str, Any]:
    title, unit, kind, targets, width = spec
    panel: dict[str, Any] = {
        "id": index + 1,
        "title": title,
        "type": kind,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": width, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                **({"format": "heatmap"} if kind == "heatmap" else {}),
                **({"instant": True, "format": "table"} if kind == "table" else {}),
            }
            for i, (legend, expr) in enumerate(targets)
        ],
    }
    return panel


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    panels: list[dict[str, Any]] = []
    x = y = 0
    for spec in PANELS:
        width = spec[4]
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(_panel(len(panels), x, y, spec))
        x += width
    y += 8
    panels.append(_row(len(panels), y, CONSOLE_ROW))
    x, y = 0, y + 1
    for spec in CONSOLE_PANELS:
        width = spec[4]
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(_panel(len(panels), x, y, spec))
        x += width
    return {
        "uid": "fraudstream",
        "title": "Fraudstream workers",
        "tags": ["fraudstream"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "editable": False,
        "panels": panels,
    }


def render() -> str:
    """The dashboard JSON as committed."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {OUT}\n")
