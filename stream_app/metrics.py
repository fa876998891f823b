"""Every Prometheus metric of the worker, declared together on a registry passed in.

Conventions: seconds as the unit of time, ``_total`` on counters, and only bounded label
values (an outcome, a reason, a topic and partition, a model version): never a customer,
card, terminal or transaction id. The monitoring rules and dashboards build on these names.

:class:`ScoreDrift` computes the ``fraudstream_score_psi`` gauge: the population stability
index of the last N live scores against the model card's reference histogram, so a drift
alert is a plain threshold (0.1 is a commonly used "look at it", 0.25 "act").
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from stream_app.errors import RejectReason
from stream_app.models.card import SCORE_BUCKET_EDGES

# End to end, producer CreateTime to the score's acknowledgement. The target is a p99 of
# 20 ms at 2,000 events/s, so buckets are dense from 1 to 50 ms; the tail up to 30 s shows
# backlogs (a restart, an outage) rather than lumping them into +Inf.
LATENCY_BUCKETS_S: Final = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# One micro-batch's steps: from a few events (sub-millisecond) to thousands (100s of ms).
STEP_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
)  # fmt: skip
# Events per micro-batch: roughly logarithmic up to the largest batch_size one would set.
BATCH_SIZE_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# Shares below this count as this much in the PSI, so an empty bucket gives a large but
# finite term instead of infinity.
PSI_FLOOR: Final = 1e-4
# Fewer live scores than this give a PSI dominated by sampling noise (13 buckets, some
# holding under 1% of the reference): the gauge stays NaN until then.
PSI_MIN_SCORES: Final = 1000

EVENT_OUTCOMES: Final = (
    "scored",
    "duplicate",
    "dead_letter",
    "unscorable",
    "conflicting_duplicate",
)
LABEL_OUTCOMES: Final = ("fraud", "genuine", "duplicate", "dead_letter")
ALERT_DECISIONS: Final = ("review", "decline")
RELOAD_OUTCOMES: Final = ("loaded", "refused")
KAFKA_OPERATIONS: Final = ("consume", "produce", "commit", "admin")
# Operators' controls (stream_app.scoring.controls): records read, entries in force by kind, and
# decisions a list set.
CONTROL_OUTCOMES: Final = ("applied", "invalid")
CONTROL_KINDS: Final = (
    "block_customer",
    "block_terminal",
    "allow_customer",
    "allow_terminal",
    "thresholds",
)
LIST_ACTIONS: Final = ("block", "allow")


def observe_many(histogram: Histogram, values: npt.NDArray[np.float64]) -> None:
    """``histogram.observe`` of every value, in one bucket search and one increment per
    bucket instead of a lock and a linear bucket scan per value (the per-event histograms
    cost ~1 µs an event otherwise). Values must be finite.

    Reads the client's bucket bounds and counters (``_upper_bounds``, ``_buckets``,
    ``_sum``); a test checks it against ``observe`` value by value.
    """
    if len(values) == 0:
        return
    bounds = np.asarray(histogram._upper_bounds, dtype=np.float64)
    # observe() counts a value in the first bucket whose bound is >= it.
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    buckets = histogram._buckets
    for i, count in enumerate(counts.tolist()):
        if count:
            buckets[i].inc(count)
    histogram._sum.inc(float(values.sum()))


class Readiness:
    """``fraudstream_ready``: what the worker's loops last set, unless a *hold* is on.

    The loops set it (0 while retrying or rebalancing, 1 once going again); a condition no
    retry clears, such as lost state, holds it at 0 until released, whatever they set
    meanwhile.
    """

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._value = 0.0
        self._holds: set[str] = set()

    def set(self, value: float) -> None:
        """What the loops say (1 ready, 0 not)."""
        self._value = value
        self._export()

    @property
    def value(self) -> float:
        """What the loops last set, holds aside."""
        return self._value

    def hold(self, reason: str) -> None:
        """Keep the gauge at 0 until :meth:`release` of the same reason."""
        self._holds.add(reason)
        self._export()

    def release(self, reason: str) -> None:
        """End a hold (no-op if not held)."""
        self._holds.discard(reason)
        self._export()

    def _export(self) -> None:
        self.gauge.set(0.0 if self._holds else self._value)


class WorkerMetrics:
    """The worker's metrics, registered on ``registry``.

    Args:
        registry: Where the metrics live; the HTTP endpoint serves this registry.
        process_collectors: Also register the default process, platform and GC collectors
            (CPU, RSS, open files, Python version, collections).
    """

    def __init__(self, registry: CollectorRegistry, *, process_collectors: bool = True) -> None:
        self.registry = registry
        if process_collectors:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.events = Counter(
            "fraudstream_events_total",
            "Transactions handled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.alerts = Counter(
            "fraudstream_alerts_total",
            "Alerts published, by decision.",
            ["decision"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "fraudstream_dead_letters_total",
            "Messages dead-lettered, by rejection reason.",
            ["reason"],
            registry=registry,
        )
        self.labels = Counter(
            "fraudstream_labels_total",
            "Labels handled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.controls = Counter(
            "fraudstream_controls_total",
            "Records read from the controls topic, by outcome (invalid: skipped, logged).",
            ["outcome"],
            registry=registry,
        )
        self.controls_in_force = Gauge(
            "fraudstream_controls_in_force",
            "Operators' controls in force, by kind: list entries by list and subject, and "
            "threshold overrides.",
            ["kind"],
            registry=registry,
        )
        self.list_decisions = Counter(
            "fraudstream_list_decisions_total",
            "Transactions whose decision a block or allow list set, by list.",
            ["list"],
            registry=registry,
        )
        self.state_quarantined = Counter(
            "fraudstream_state_quarantined_total",
            "State keys found corrupt (another type or size than the worker writes) and set "
            "aside; the events they concerned were scored from empty state.",
            registry=registry,
        )
        self.repartitioned = Counter(
            "fraudstream_repartitioned_total",
            "Transactions that arrived on a partition other than their customer's and were "
            "re-keyed through the repartition topic.",
            registry=registry,
        )
        self.shadow_scores = Counter(
            "fraudstream_shadow_scores_total",
            "Transactions scored by the challenger model.",
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "fraudstream_end_to_end_latency_seconds",
            "From the transaction's Kafka record timestamp (producer CreateTime) to the "
            "acknowledgement of its score record.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.processing = Histogram(
            "fraudstream_processing_seconds",
            "Time to process one micro-batch, from poll to committed offsets.",
            buckets=STEP_BUCKETS_S,
            registry=registry,
        )
        self.inference = Histogram(
            "fraudstream_inference_seconds",
            "ONNX Runtime time per micro-batch (scores and alert reasons).",
            buckets=STEP_BUCKETS_S,
            registry=registry,
        )
        self.redis = Histogram(
            "fraudstream_redis_seconds",
            "Redis round trip per micro-batch (state update and read).",
            buckets=STEP_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = Histogram(
            "fraudstream_batch_size",
            "Messages per micro-batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.score = Histogram(
            "fraudstream_score",
            "Champion scores; the buckets are the model card's reference histogram's.",
            buckets=SCORE_BUCKET_EDGES,
            registry=registry,
        )
        self.score_psi = Gauge(
            "fraudstream_score_psi",
            "Population stability index of the last N champion scores against the "
            "model card's reference histogram.",
            registry=registry,
        )
        self.model_info = Gauge(
            "fraudstream_model_info",
            "1 for each model serving, by version and role.",
            ["version", "role"],
            registry=registry,
        )
        self.model_reloads = Counter(
            "fraudstream_model_reloads_total",
            "Model loads after start-up, by outcome (refused: failed to load or its checks).",
            ["outcome"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "fraudstream_consumer_lag",
            "Messages of the partition not yet processed: the brokers' end offset minus "
            "the group's committed position, refreshed every second whatever the worker "
            "is busy with.",
            ["topic", "partition"],
            registry=registry,
        )
        self.offset_resets = Counter(
            "fraudstream_offset_resets_total",
            "Input partitions found with their position out of range (topic deleted and "
            "re-created, or truncated), by topic and FRAUDSTREAM_OFFSET_RESET_POLICY applied.",
            ["topic", "policy"],
            registry=registry,
        )
        self.last_commit_timestamp = Gauge(
            "fraudstream_last_commit_timestamp_seconds",
            "Unix time of the last successful offset commit.",
            registry=registry,
        )
        self.offsets_committed = Counter(
            "fraudstream_offsets_committed_total",
            "Messages whose offsets were committed.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "fraudstream_redis_errors_total",
            "Failed Redis calls (each is retried).",
            registry=registry,
        )
        self.kafka_errors = Counter(
            "fraudstream_kafka_errors_total",
            "Failed Kafka operations (each is retried), by operation.",
            ["operation"],
            registry=registry,
        )
        self.ready = Readiness(
            Gauge(
                "fraudstream_ready",
                "1 while the worker has partitions to score and its last Redis and Kafka "
                "calls succeeded; 0 during start-up, rebalances and retries, and while its "
                "state is lost (fraudstream_state_lost).",
                registry=registry,
            )
        )
        self.state_lost = Gauge(
            "fraudstream_state_lost",
            "1 while Redis has lost this deployment's state (its state marker is gone, of "
            "another epoch, or went back): scores come from partial history until "
            "`fraudstream rebuild-state` has run; 0 otherwise.",
            registry=registry,
        )
        # Pre-create the bounded label values, so every series exists from the start and
        # rate() over a fresh worker reads 0 instead of nothing.
        for outcome in EVENT_OUTCOMES:
            self.events.labels(outcome)
        for outcome in LABEL_OUTCOMES:
            self.labels.labels(outcome)
        for decision in ALERT_DECISIONS:
            self.alerts.labels(decision)
        for outcome in RELOAD_OUTCOMES:
            self.model_reloads.labels(outcome)
        for operation in KAFKA_OPERATIONS:
            self.kafka_errors.labels(operation)
        for outcome in CONTROL_OUTCOMES:
            self.controls.labels(outcome)
        for kind in CONTROL_KINDS:
            self.controls_in_force.labels(kind)
        for action in LIST_ACTIONS:
            self.list_decisions.labels(action)
        for reason in RejectReason:
            self.dead_letters.labels(reason.value)


def score_buckets(scores: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Bucket of each score in :data:`SCORE_BUCKET_EDGES` (upper edges inclusive)."""
    edges = np.asarray(SCORE_BUCKET_EDGES)
    index = np.searchsorted(edges, scores, side="left")
    result: npt.NDArray[np.int64] = np.minimum(index, len(edges) - 1).astype(np.int64)
    return result


def population_stability_index(
    actual: npt.NDArray[np.float64], expected: npt.NDArray[np.float64]
) -> float:
    """PSI between two histograms of shares: ``sum((a - e) * ln(a / e))``.

    >>> round(population_stability_index(np.array([0.5, 0.5]), np.array([0.5, 0.5])), 6)
    0.0
    """
    a = np.maximum(actual, PSI_FLOOR)
    e = np.maximum(expected, PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


class ScoreDrift:
    """PSI of the last ``window`` scores against a reference histogram, updated per batch.

    >>> drift = ScoreDrift([1 / 13] * 13, window=2000)
    >>> drift.update(np.linspace(0, 1, 500))  # too few scores yet
    nan
    >>> 0 < drift.update(np.full(1500, 0.0005)) < 10
    True

    Keeps the bucket of each of the last ``window`` scores in a ring, and the counts per
    bucket, so an update costs the batch's size, not the window's.

    Args:
        reference: Share of reference scores in each :data:`SCORE_BUCKET_EDGES` bucket.
        window: How many recent scores to compare.
    """

    def __init__(self, reference: list[float], window: int) -> None:
        if len(reference) != len(SCORE_BUCKET_EDGES):
            raise ValueError("the reference histogram needs one share per score bucket")
        self.reference = np.asarray(reference, dtype=np.float64)
        self.window = window
        self._ring = np.full(window, -1, dtype=np.int64)
        self._next = 0
        self._filled = 0
        self._counts = np.zeros(len(SCORE_BUCKET_EDGES), dtype=np.int64)

    def update(self, scores: npt.NDArray[np.float64]) -> float:
        """Add a batch of scores; returns the PSI (NaN while too few scores were seen)."""
        buckets = score_buckets(scores[-self.window :])
        n = len(buckets)
        slots = (self._next + np.arange(n)) % self.window
        old = self._ring[slots]
        np.subtract.at(self._counts, old[old >= 0], 1)
        np.add.at(self._counts, buckets, 1)
        self._ring[slots] = buckets
        self._next = (self._next + n) % self.window
        self._filled = min(self._filled + n, self.window)
        return self.value

    @property
    def value(self) -> float:
        """The current PSI, NaN before ``min(window, PSI_MIN_SCORES)`` scores."""
        if self._filled < min(self.window, PSI_MIN_SCORES):
            return math.nan
        return population_stability_index(self._counts / self._filled, self.reference)


def metrics_table() -> str:
    """The README's metrics reference: every metric the worker exports, as Markdown."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = WorkerMetrics(CollectorRegistry(), process_collectors=False)
    rows = ["| Metric | Type | Labels | Description |", "| --- | --- | --- | --- |"]
    for value in vars(metrics).values():
        if isinstance(value, Readiness):
            value = value.gauge
        if not isinstance(value, MetricWrapperBase):
            continue
        name = value._name  # the exported name, suffixes aside
        kind = value._type
        if kind == "counter":
            name += "_total"
        labels = ", ".join(f"`{label}`" for label in value._labelnames) or "-"
        rows.append(f"| `{name}` | {kind} | {labels} | {value._documentation} |")
    rows.append(
        "| `process_*`, `python_*` | - | - | CPU seconds, resident memory, open files, GC "
        "(prometheus_client's default collectors). |"
    )
    return "\n".join(rows) + "\n"
