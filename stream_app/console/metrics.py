"""The review console's Prometheus metrics, declared together on a registry passed in.

Same conventions as :mod:`stream_app.metrics`: seconds, ``_total`` on counters, bounded
label values only (a status, an outcome; never a user, customer or transaction).
The case counts and the oldest age are set from the store (:meth:`ConsoleMetrics.refresh`),
so several console replicas over one database all report the same queue.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream_app.console.store import QueueStats

# Time from an alert's arrival to its verdict: minutes for a busy queue, up to days when a
# case waits for a supervisor; buckets cover 1 minute to 1 week.
TIME_TO_VERDICT_BUCKETS_S: Final = (
    60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 86_400, 2 * 86_400, 7 * 86_400,
)  # fmt: skip
ALERT_OUTCOMES: Final = ("opened", "duplicate", "invalid")
VERDICT_OUTCOMES: Final = ("fraud", "legitimate", "escalate")
LOGIN_OUTCOMES: Final = ("success", "failure", "rate_limited")
CASE_STATUSES: Final = ("open", "escalated")


class ConsoleMetrics:
    """Every metric of the console.

    Args:
        registry: Where the metrics live; the console's metrics endpoint serves it.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.cases = Gauge(
            "fraudstream_console_cases",
            "Cases waiting for a verdict, by status (open, escalated).",
            ["status"],
            registry=registry,
        )
        self.oldest_case_age = Gauge(
            "fraudstream_console_oldest_case_age_seconds",
            "Age of the oldest case waiting for a verdict (0 when none waits).",
            registry=registry,
        )
        # Exported so that the dashboard and the FraudstreamConsoleCasesPastSla rule compare
        # the oldest case with the SLA the console was given, not with a copy of it.
        self.sla = Gauge(
            "fraudstream_console_sla_seconds",
            "Time a case may wait for a verdict (FRAUDSTREAM_CONSOLE_SLA_S).",
            registry=registry,
        )
        self.alerts = Counter(
            "fraudstream_console_alerts_total",
            "Alerts read from the alerts topic, by outcome (opened, duplicate, invalid).",
            ["outcome"],
            registry=registry,
        )
        self.verdicts = Counter(
            "fraudstream_console_verdicts_total",
            "Verdicts recorded, by outcome (fraud, legitimate, escalate).",
            ["outcome"],
            registry=registry,
        )
        self.time_to_verdict = Histogram(
            "fraudstream_console_time_to_verdict_seconds",
            "Time from a case's opening to its closing verdict (fraud or legitimate).",
            buckets=TIME_TO_VERDICT_BUCKETS_S,
            registry=registry,
        )
        self.history = Counter(
            "fraudstream_console_history_records_total",
            "Scored transactions kept for the case view's timelines.",
            registry=registry,
        )
        self.labels_published = Counter(
            "fraudstream_console_labels_published_total",
            "Labels from verdicts acknowledged by the labels topic.",
            registry=registry,
        )
        self.controls_published = Counter(
            "fraudstream_console_controls_published_total",
            "Operators' control changes (lists, threshold overrides) acknowledged by the "
            "controls topic.",
            registry=registry,
        )
        self.logins = Counter(
            "fraudstream_console_logins_total",
            "Login attempts, by outcome (success, failure, rate_limited).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ALERT_OUTCOMES:
            self.alerts.labels(outcome)
        for outcome in VERDICT_OUTCOMES:
            self.verdicts.labels(outcome)
        for outcome in LOGIN_OUTCOMES:
            self.logins.labels(outcome)

    def refresh(self, stats: QueueStats, now_s: float) -> None:
        """Set the queue gauges from the store's counts."""
        self.cases.labels("open").set(stats.open_cases)
        self.cases.labels("escalated").set(stats.escalated_cases)
        oldest = stats.oldest_opened_at
        self.oldest_case_age.set(0.0 if oldest is None else max(0.0, now_s - oldest))


def console_metrics_table() -> str:
    """The README's reference of the console's metrics, as Markdown (like the worker's)."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = ConsoleMetrics(CollectorRegistry())
    rows = ["| Metric | Type | Labels | Description |", "| --- | --- | --- | --- |"]
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name = value._name + ("_total" if value._type == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in value._labelnames) or "-"
        rows.append(f"| `{name}` | {value._type} | {labels} | {value._documentation} |")
    return "\n".join(rows) + "\n"
