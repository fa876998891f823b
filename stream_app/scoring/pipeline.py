"""One micro-batch, from raw messages to records: the worker's computation, without Kafka.

::

    raw messages ─ validate ─┬─ rejected ──────────────────────────────► dead letters
                             └─ events ─ state (1 Redis call) ─ features
                                  ─ champion (1 ONNX call) ─ decisions
                                  ─ reasons for alerts (1 more ONNX call, alerts only)
                                  ─ challenger (1 ONNX call, if any) ──► ScoreRecords

Nothing here is per-event I/O: one Redis round trip and at most three model calls per
batch, whatever its size. The Kafka side (consuming, routing, publishing, committing)
lives in :mod:`stream_app.worker.loop`; keeping it out makes this module testable against the
real Redis and a real model with no broker.

A redelivered transaction (already in its customer's history) changes no state and gets
the features it was first scored with, hence the same score, decision and reasons; its
record is published again, since the first one may never have been acknowledged.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_app import features
from stream_app.errors import RejectedEvent, RejectReason
from stream_app.metrics import ScoreDrift, WorkerMetrics, observe_many
from stream_app.models.registry import ModelRegistry, ServingModel
from stream_app.models.scorer import valid_scores
from stream_app.records import (
    MAX_REASONS,
    Decision,
    ScoreRecord,
    TransactionEvent,
    ValidationLimits,
    iso_utc_millis,
    parse_label,
    parse_transaction,
    score_record_json,
)
from stream_app.scoring.controls import Controls, list_decision, list_reason
from stream_app.scoring.decisions import decide
from stream_app.scoring.reasons import STATE_RESET_REASON, AlertContext, explain_alerts
from stream_app.state.store import (
    BatchState,
    ExpiredLabel,
    LabelOutcome,
    LabelUpdate,
    StateStore,
    TransactionUpdate,
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def epoch_ms(moment: datetime) -> int:
    """Integer epoch milliseconds of an aware datetime, truncated like the offline path.

    >>> epoch_ms(datetime(2018, 4, 1, 0, 3, 12, 500999, tzinfo=UTC))
    1522540992500
    """
    return (moment - _EPOCH) // _MS


@dataclass(frozen=True, slots=True)
class Inbound:
    """One consumed message: what validation, routing and dead-lettering need of it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int  # the Kafka record timestamp (producer CreateTime)


@dataclass(frozen=True, slots=True)
class Accepted:
    """A message that passed validation."""

    message: Inbound
    event: TransactionEvent


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that failed validation, with why."""

    message: Inbound
    error: RejectedEvent


def validate_transaction(message: Inbound, limits: ValidationLimits) -> Accepted | Rejected:
    """Validate one message from the transactions topic."""
    try:
        return Accepted(message, parse_transaction(message.value or b"", limits))
    except RejectedEvent as exc:
        return Rejected(message, exc)


def validate_transactions(
    messages: Sequence[Inbound], limits: ValidationLimits
) -> tuple[list[Accepted], list[Rejected]]:
    """Split messages into valid transactions and rejections, keeping their order."""
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    for message in messages:
        outcome = validate_transaction(message, limits)
        if isinstance(outcome, Accepted):
            accepted.append(outcome)
        else:
            rejected.append(outcome)
    return accepted, rejected


@dataclass(frozen=True)
class ScoredBatch:
    """The records of one micro-batch, in the order of its events, ready to publish.

    Records are JSON bytes written straight from the batch's arrays (the hot path);
    :attr:`records` reads them back through :class:`ScoreRecord`, the schema.
    """

    keys: list[bytes]  # each record's Kafka key: its customer id
    payloads: list[bytes]  # ScoreRecord JSON
    alerts: list[int]  # positions in ``payloads`` of the review and decline ones
    duplicate: npt.NDArray[np.bool_]
    model_version: str = ""  # the champion version that scored the whole batch
    shadow_payloads: list[bytes] = field(default_factory=list)
    shadow_keys: list[bytes] = field(default_factory=list)
    # Positions (in the events given to ``score``) the champion could not score: no record
    # here; the worker dead-letters them (``unscorable``). Records are for the other events,
    # in their order.
    unscorable: list[int] = field(default_factory=list)
    # Positions of conflicting duplicates (an id already used for another transaction): no
    # record either; the worker dead-letters them (``conflicting_duplicate``).
    conflicting: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls) -> ScoredBatch:
        """A batch with no events."""
        return cls([], [], [], np.zeros(0, dtype=bool))

    @functools.cached_property
    def records(self) -> list[ScoreRecord]:
        """The champion's records, validated against the schema (tests, tools; not hot)."""
        return [ScoreRecord.from_json(p) for p in self.payloads]

    @functools.cached_property
    def shadow(self) -> list[ScoreRecord]:
        """The challenger's records, validated; empty without a challenger."""
        return [ScoreRecord.from_json(p) for p in self.shadow_payloads]


def checked_scores(
    raw: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]],
    batch: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Scores of a batch, and which of them are probabilities; never raises.

    Rows are scored independently, so one row's output says nothing of the others: an
    invalid output (not finite, outside [0, 1]) condemns its row alone. A model call that
    fails outright is bisected until the rows that make it fail are found, so one event
    can never stop a batch (nor, redelivered after a restart, the worker).
    """
    try:
        scores = raw(batch)
    except Exception:  # onnxruntime raises its own untyped errors
        if len(batch) <= 1:
            return np.full(len(batch), np.nan), np.zeros(len(batch), dtype=bool)
        middle = len(batch) // 2
        head, head_ok = checked_scores(raw, batch[:middle])
        tail, tail_ok = checked_scores(raw, batch[middle:])
        return np.concatenate([head, tail]), np.concatenate([head_ok, tail_ok])
    return scores, valid_scores(scores)


def _probabilities(
    raw: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]],
) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]:
    # Occlusion feeds the model inputs no event had; an invalid output there must not stop
    # the batch: it counts as "no change", which only weakens that reason.
    def score(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        scores, ok = checked_scores(raw, batch)
        return np.where(ok, scores, 0.5)

    return score


def utc_millis(epoch_ms: Sequence[int]) -> list[str]:
    """:func:`~stream_app.records.iso_utc_millis` for a whole batch of epoch milliseconds.

    >>> utc_millis([1522540992500])
    ['2018-04-01T00:03:12.500Z']
    """
    text = np.datetime_as_string(np.asarray(epoch_ms, dtype="datetime64[ms]"), unit="ms")
    return [t + "Z" for t in text.tolist()]


def _payloads(
    events: Sequence[TransactionEvent],
    event_times: Sequence[str],
    scores: npt.NDArray[np.float64],
    decisions: Sequence[Decision],
    reasons: dict[int, tuple[str, ...]],
    attributions: dict[int, list[dict[str, object]]],
    version: str,
    scored_at: str,
) -> list[bytes]:
    return [
        score_record_json(
            transaction_id=event.transaction_id,
            customer_id=event.customer_id,
            terminal_id=event.terminal_id,
            amount=event.amount,
            event_time=event_times[i],
            score=score,
            decision=decisions[i],
            reasons=reasons.get(i, ()),
            attributions=attributions.get(i, ()),
            model_version=version,
            scored_at=scored_at,
        )
        for i, (event, score) in enumerate(zip(events, scores.tolist(), strict=True))
    ]


class ScoringPipeline:
    """State, features, model calls and records for micro-batches of valid transactions.

    Args:
        store: Customer and terminal state (Redis in the worker).
        models: The serving models; read once per batch, so a swap lands between batches.
        metrics: Where step timings, outcomes, scores and drift are recorded.
        max_reasons: Reasons per alert.
        psi_window: Scores the drift gauge looks back over.
        controls: The operators' controls in force, read once per batch (the worker's
            :class:`~stream_app.scoring.controls.ControlsFeed`); none by default.
    """

    def __init__(
        self,
        store: StateStore,
        models: ModelRegistry,
        metrics: WorkerMetrics,
        *,
        max_reasons: int = 3,
        psi_window: int = 10_000,
        controls: Callable[[], Controls] = Controls,
    ) -> None:
        self.store = store
        self.controls = controls
        self.models = models
        self.metrics = metrics
        self.max_reasons = max_reasons
        self.psi_window = psi_window
        self._drift: ScoreDrift | None = None
        self._drift_version = ""

    def _update_drift(self, champion: ServingModel, scores: npt.NDArray[np.float64]) -> None:
        if self._drift is None or self._drift_version != champion.version:
            # A new model has its own reference histogram: start the window afresh.
            self._drift = ScoreDrift(champion.reference_histogram, self.psi_window)
            self._drift_version = champion.version
        self.metrics.score_psi.set(self._drift.update(scores))

    async def update_state(self, events: Sequence[TransactionEvent]) -> BatchState:
        """Apply a micro-batch to the state store in one round trip; returns its histories.

        Raises:
            redis.exceptions.RedisError: nothing can be assumed applied or not; retrying is
                safe (an applied event comes back as a duplicate with its first inputs).
        """
        updates = [
            TransactionUpdate(
                e.transaction_id, e.customer_id, e.terminal_id, epoch_ms(e.timestamp), e.amount
            )
            for e in events
        ]
        started = time.perf_counter()
        state = await self.store.apply_transactions(updates)
        self.metrics.redis.observe(time.perf_counter() - started)
        # Labels that waited for these transactions, counted by what they did now.
        for outcome in state.labels_applied:
            self.metrics.labels.labels(outcome.value).inc()
        return state

    def score(self, events: Sequence[TransactionEvent], state: BatchState) -> ScoredBatch:
        """Features, model calls, decisions, reasons and records of a micro-batch.

        ``state`` is what :meth:`update_state` returned for the same events. The serving
        models are read once here, so the whole batch is scored by one champion.

        An event the champion cannot score (its output is not a probability, or the model
        call fails on it) gets no record: its position is in ``unscorable``, and the rest of
        the batch is scored as usual.
        """
        if not events:
            return ScoredBatch.empty()
        champion = self.models.champion
        challenger = self.models.challenger
        started = time.perf_counter()
        current, sequences = features.online_features(state.history, champion.sequence_length)
        batch = sequences.astype(np.float32)
        scores, ok = checked_scores(champion.scorer.raw_scores, batch)
        conflict = state.conflicts
        unscorable = np.flatnonzero(~ok & ~conflict).tolist()
        conflicting = np.flatnonzero(conflict).tolist()
        duplicate = state.duplicate
        reset = state.resets
        origin = np.arange(len(events))  # each kept event's position in state.history
        if unscorable or conflicting:
            ok &= ~conflict
            keep = np.flatnonzero(ok)
            origin = keep
            events = [events[i] for i in keep.tolist()]
            batch, scores, duplicate = batch[keep], scores[keep], duplicate[keep]
            current, reset = current[keep], reset[keep]
            self.metrics.events.labels("unscorable").inc(len(unscorable))
            self.metrics.events.labels("conflicting_duplicate").inc(len(conflicting))
            if not events:
                return dataclasses.replace(
                    ScoredBatch.empty(), unscorable=unscorable, conflicting=conflicting
                )
        event_ms = [epoch_ms(e.timestamp) for e in events]
        controls = self.controls()
        decisions = decide(scores, controls.thresholds(champion.version, champion.thresholds))
        listed = controls.listed(events) if controls.has_lists else {}
        for i, entry in listed.items():
            decisions[i] = list_decision(entry)
            self.metrics.list_decisions.labels(entry.action.value).inc()
        alerts = [i for i, d in enumerate(decisions) if d is not Decision.APPROVE]
        reasons: dict[int, tuple[str, ...]] = {}
        attributions: dict[int, list[dict[str, object]]] = {}
        if alerts:
            history = state.history
            rows = features.sequence_index(
                history.group, champion.sequence_length, history.last_rows
            )[origin[alerts]]
            contexts = [
                AlertContext(
                    float(scores[i]),
                    events[i].amount,
                    event_ms[i],
                    current[i],
                    tuple(
                        (int(history.times_ms[r]), float(history.amounts[r]))
                        for r in row[:-1].tolist()
                        if r >= 0
                    ),
                )
                for i, row in zip(alerts, rows, strict=True)
            ]
            explained = explain_alerts(
                batch[alerts],
                scores[alerts],
                contexts,
                champion.feature_mean,
                _probabilities(champion.scorer.raw_scores),
                self.max_reasons,
            )
            for i, explanation in zip(alerts, explained, strict=True):
                reasons[i] = explanation.reasons
                attributions[i] = [a.as_dict() for a in explanation.attributions]
        for i in np.flatnonzero(reset).tolist():
            reasons[i] = (STATE_RESET_REASON, *reasons.get(i, ()))[:MAX_REASONS]
        for i, entry in listed.items():
            reasons[i] = (list_reason(entry), *reasons.get(i, ()))[:MAX_REASONS]
        shadow_scores = None
        shadow_ok = np.zeros(0, dtype=bool)
        if challenger is not None:
            if challenger.sequence_length == champion.sequence_length:
                shadow_batch = batch
            else:
                _, other = features.online_features(state.history, challenger.sequence_length)
                shadow_batch = other.astype(np.float32)
                if unscorable or conflicting:
                    shadow_batch = shadow_batch[np.flatnonzero(ok)]
            # The challenger only observes: a row it cannot score gets no shadow record.
            shadow_scores, shadow_ok = checked_scores(challenger.scorer.raw_scores, shadow_batch)
        self.metrics.inference.observe(time.perf_counter() - started)

        scored_at = iso_utc_millis(time.time())
        times = utc_millis(event_ms)
        payloads = _payloads(
            events, times, scores, decisions, reasons, attributions, champion.version, scored_at
        )
        keys = [e.customer_id.encode() for e in events]
        shadow: list[bytes] = []
        shadow_keys: list[bytes] = []
        if challenger is not None and shadow_scores is not None:
            rows = np.flatnonzero(shadow_ok)
            taken = rows.tolist()
            shadow_keys = [keys[i] for i in taken]
            shadow = _payloads(
                [events[i] for i in taken],
                [times[i] for i in taken],
                shadow_scores[rows],
                decide(shadow_scores[rows], challenger.thresholds),
                {},
                {},
                challenger.version,
                scored_at,
            )
            self.metrics.shadow_scores.inc(len(shadow))

        n_duplicate = int(duplicate.sum())
        self.metrics.events.labels("scored").inc(len(events) - n_duplicate)
        self.metrics.events.labels("duplicate").inc(n_duplicate)
        for i in alerts:
            self.metrics.alerts.labels(decisions[i].value).inc()
        observe_many(self.metrics.score, scores)
        self._update_drift(champion, scores)
        return ScoredBatch(
            keys,
            payloads,
            alerts,
            duplicate,
            champion.version,
            shadow,
            shadow_keys,
            unscorable,
            conflicting,
        )

    async def process(self, events: Sequence[TransactionEvent]) -> ScoredBatch:
        """:meth:`update_state` then :meth:`score`: a whole micro-batch in one call."""
        if not events:
            return ScoredBatch.empty()
        return self.score(events, await self.update_state(events))


@dataclass(frozen=True)
class LabelBatch:
    """The outcome of a micro-batch of labels: what each valid one did, and the refused."""

    rejected: list[Rejected]
    outcomes: list[LabelOutcome]
    frauds: int  # valid labels with a fraud verdict
    genuine: int  # valid labels with a genuine verdict
    new_frauds: int  # fraud verdicts that changed a terminal's counters


_SOURCE: Final = struct.Struct("<iqqii")  # partition, offset, timestamp, topic and key lengths


def pack_source(message: Inbound) -> bytes:
    """A message as a pending label keeps it, to dead-letter it as it came if it expires."""
    topic = message.topic.encode()
    key = message.key
    head = _SOURCE.pack(
        message.partition,
        message.offset,
        message.timestamp_ms,
        len(topic),
        -1 if key is None else len(key),
    )
    return b"".join((head, topic, key or b"", message.value or b""))


def unpack_source(source: bytes) -> Inbound:
    """The message :func:`pack_source` packed."""
    partition, offset, timestamp_ms, topic_len, key_len = _SOURCE.unpack_from(source)
    at = _SOURCE.size
    topic = source[at : at + topic_len].decode()
    at += topic_len
    key = None if key_len < 0 else source[at : at + key_len]
    at += max(key_len, 0)
    return Inbound(topic, partition, offset, key, source[at:], timestamp_ms)


def label_update(message: Inbound, limits: ValidationLimits) -> LabelUpdate:
    """The state update of one labels-topic message (with its source: a label whose
    transaction has not come yet waits for it, and is dead-lettered as it came if it never
    does). The worker and ``fraudstream rebuild-state`` both make them here.

    Raises:
        RejectedEvent: the label is invalid; it is to be dead-lettered.
    """
    label = parse_label(message.value or b"", limits)
    return LabelUpdate(
        label.transaction_id,
        label.customer_id,
        label.terminal_id,
        epoch_ms(label.event_time),
        label.is_fraud,
        epoch_ms(label.reported_at),
        pack_source(message),
    )


async def apply_labels(
    messages: Sequence[Inbound],
    store: StateStore,
    limits: ValidationLimits,
    metrics: WorkerMetrics,
) -> LabelBatch:
    """Validate labels and reconcile them with the transactions, one Redis call.

    A label refused by validation, or whose transaction has another customer, terminal or
    time (``label_mismatch``), is to be dead-lettered: it is in ``rejected``. A label
    whose transaction is not known yet waits for it (``pending``). The metric counts each
    label by outcome.
    """
    updates: list[LabelUpdate] = []
    parsed: list[Inbound] = []
    rejected: list[Rejected] = []
    for message in messages:
        try:
            updates.append(label_update(message, limits))
        except RejectedEvent as exc:
            rejected.append(Rejected(message, exc))
            continue
        parsed.append(message)
    started = time.perf_counter()
    outcomes = await store.apply_labels(updates)
    metrics.redis.observe(time.perf_counter() - started)
    for update, message, outcome in zip(updates, parsed, outcomes, strict=True):
        metrics.labels.labels(outcome.value).inc()
        if outcome is LabelOutcome.MISMATCH:
            rejected.append(
                Rejected(
                    message,
                    RejectedEvent(
                        RejectReason.LABEL_MISMATCH,
                        f"transaction {update.transaction_id!r} was scored with another "
                        "customer, terminal or time than this label names",
                    ),
                )
            )
    metrics.labels.labels("dead_letter").inc(len(rejected))
    frauds = sum(1 for u in updates if u.is_fraud)
    new_frauds = sum(
        1
        for u, o in zip(updates, outcomes, strict=True)
        if u.is_fraud and o in (LabelOutcome.FRAUD, LabelOutcome.CORRECTED)
    )
    return LabelBatch(rejected, outcomes, frauds, len(updates) - frauds, new_frauds)


async def expired_labels(
    store: StateStore, wait_s: float, metrics: WorkerMetrics, limit: int = 1000
) -> tuple[list[Rejected], list[ExpiredLabel]]:
    """Pending labels whose transaction never came: their dead letters, and the labels (to
    :meth:`~stream_app.state.store.StateStore.drop_pending` once the dead letters are out)."""
    expired = await store.expired_labels(limit)
    rejected = [
        Rejected(
            unpack_source(e.source),
            RejectedEvent(
                RejectReason.LABEL_UNKNOWN_TRANSACTION,
                f"no transaction {e.transaction_id!r} with this label's customer, terminal "
                f"and time was scored within {wait_s:g} s",
            ),
        )
        for e in expired
    ]
    metrics.labels.labels("expired").inc(len(rejected))
    return rejected, expired
