"""Operators' controls: block and allow lists and threshold overrides, in every worker.

The review console publishes each change as a :class:`~stream_app.records.Control` on the
controls topic (one partition, compacted, keyed by :attr:`~stream_app.records.Control.key`).
Every worker reads that whole topic with a consumer of no group, since each needs every
entry rather than a share of them: from its beginning at start-up, before it scores
anything (so a restarted worker never approves a blocked card), then as it grows, so a
change is in force within about a second, with no restart.

Controls act on the decision only. The score stays the model's, so drift, calibration and
the analysts' view of what the model thought are unchanged; the record's first reason says
which list decided ("terminal on block list since 2026-11-30 21:50 UTC, by sue: ...").

* A **block** entry declines every transaction of its customer or terminal.
* An **allow** entry approves them; a block of the other subject still wins (a trusted
  customer paying at a compromised terminal is declined).
* A **threshold override** replaces the review and decline thresholds of one champion
  version; another version (after a model swap) keeps its card's, since cut-offs chosen
  for one model's scores mean nothing for another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream_app.config import Settings
from stream_app.errors import ConfigError, RejectedEvent
from stream_app.kafka import config as kafka_config
from stream_app.metrics import CONTROL_KINDS, WorkerMetrics
from stream_app.models.card import Thresholds
from stream_app.records import (
    MAX_REASON_LENGTH,
    Control,
    ControlAction,
    Decision,
    TransactionEvent,
    parse_control,
)

log = logging.getLogger(__name__)

# How long the start-up read of the topic may take before the worker gives up, and how
# long a fetch waits for new records once caught up.
CATCH_UP_TIMEOUT_S: Final = 30.0
_FOLLOW_WAIT_MS: Final = 250
_RETRY_S: Final = 1.0

_LIST_DECISIONS: Final = {
    ControlAction.BLOCK: Decision.DECLINE,
    ControlAction.ALLOW: Decision.APPROVE,
}


def list_reason(control: Control) -> str:
    """The reason a list entry puts first on the records it decides.

    >>> from datetime import UTC, datetime
    >>> entry = Control(action="block", active=True, subject="terminal", subject_id="8817",
    ...                 changed_by="sue", changed_at=datetime(2026, 11, 30, 21, 50, tzinfo=UTC),
    ...                 note="skimmer found")
    >>> list_reason(entry)
    'terminal on block list since 2026-11-30 21:50 UTC, by sue: skimmer found'
    """
    text = (
        f"{control.subject} on {control.action} list since "
        f"{control.changed_at:%Y-%m-%d %H:%M} UTC, by {control.changed_by}"
    )
    if control.note:
        text += f": {' '.join(control.note.split())}"
    if len(text) > MAX_REASON_LENGTH:
        text = text[: MAX_REASON_LENGTH - 1] + "…"
    return text


@dataclass(frozen=True)
class Controls:
    """The controls in force: the latest active record of each key. Immutable, so the
    scoring thread reads one consistent snapshot while the feed builds the next."""

    entries: Mapping[str, Control] = field(default_factory=dict)

    def updated(self, control: Control) -> Controls:
        """These controls with ``control`` applied (an inactive one lifts its key)."""
        entries = dict(self.entries)
        if control.active:
            entries[control.key] = control
        else:
            entries.pop(control.key, None)
        return Controls(entries)

    @property
    def has_lists(self) -> bool:
        """Whether any list entry is in force (the hot path skips the lookups if not)."""
        return any(c.action is not ControlAction.THRESHOLDS for c in self.entries.values())

    def thresholds(self, model_version: str, card: Thresholds) -> Thresholds:
        """The thresholds the champion ``model_version`` decides with: an override's, if
        one is in force for that version, else ``card``'s."""
        override = self.entries.get(f"thresholds:{model_version}")
        if override is None:
            return card
        assert override.review_threshold is not None and override.decline_threshold is not None
        rule = f"override by {override.changed_by} at {override.changed_at:%Y-%m-%d %H:%M} UTC"
        return Thresholds(
            review=override.review_threshold,
            decline=override.decline_threshold,
            review_rule=rule,
            decline_rule=rule,
        )

    def listed(self, events: Sequence[TransactionEvent]) -> dict[int, Control]:
        """The list entry that decides each listed event, by position; a block wins."""
        decided: dict[int, Control] = {}
        entries = self.entries
        for i, event in enumerate(events):
            terminal = entries.get(f"list:terminal:{event.terminal_id}")
            customer = entries.get(f"list:customer:{event.customer_id}")
            if terminal is None and customer is None:
                continue
            candidates = [c for c in (terminal, customer) if c is not None]
            blocks = [c for c in candidates if c.action is ControlAction.BLOCK]
            decided[i] = (blocks or candidates)[0]
        return decided

    def counts(self) -> dict[str, int]:
        """Entries in force by kind (:data:`CONTROL_KINDS`)."""
        counts = dict.fromkeys(CONTROL_KINDS, 0)
        for control in self.entries.values():
            if control.action is ControlAction.THRESHOLDS:
                counts["thresholds"] += 1
            else:
                counts[f"{control.action}_{control.subject}"] += 1
        return counts


def list_decision(control: Control) -> Decision:
    """The decision a list entry imposes."""
    return _LIST_DECISIONS[control.action]


class ControlsFeed:
    """Follows the controls topic into :attr:`current`, from its beginning.

    Args:
        settings: Kafka connection and ``topic_controls``.
        metrics: Counts records read and entries in force.
    """

    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current = Controls()
        self._stopping = asyncio.Event()
        self._consumer = AIOKafkaConsumer(
            **{
                **kafka_config.consumer_kwargs(settings, None),
                "enable_auto_commit": False,
                "auto_offset_reset": "earliest",
            }
        )
        self._partitions: list[TopicPartition] = []
        self._started = False

    async def start(self, timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Read the topic up to its end as of now: the controls in force at start-up.

        Raises:
            ConfigError: the topic has no partition (it does not exist), or could not be
                read to its end within ``timeout_s``.
            aiokafka.errors.KafkaError: the brokers cannot be reached (the caller retries).
        """
        topic = self.settings.topic_controls
        if not self._started:
            await self._consumer.start()
            self._started = True
        partitions = self._consumer.partitions_for_topic(topic)
        if not partitions:
            await self._consumer._client.force_metadata_update()
            partitions = self._consumer.partitions_for_topic(topic)
        if not partitions:
            raise ConfigError(
                f"the controls topic {topic} does not exist: create it or set "
                "FRAUDSTREAM_CREATE_TOPICS=true (FRAUDSTREAM_TOPIC_CONTROLS names it)"
            )
        self._partitions = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)
        ends = await self._consumer.end_offsets(self._partitions)
        deadline = time.monotonic() + timeout_s
        while not await self._caught_up(ends):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"could not read the controls topic {topic} to its end within "
                    f"{timeout_s:g} s: check that the worker may Read it"
                )
            await self._read(_FOLLOW_WAIT_MS)
        self._export()
        log.info(
            "controls in force: %s",
            ", ".join(f"{k} {v}" for k, v in self.current.counts().items() if v) or "none",
        )

    async def _caught_up(self, ends: Mapping[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def run(self) -> None:
        """Follow the topic until :meth:`stop`; a broker outage keeps the last controls."""
        while not self._stopping.is_set():
            try:
                await self._read(_FOLLOW_WAIT_MS)
            except KafkaError as exc:
                self.metrics.kafka_errors.labels("consume").inc()
                log.warning(
                    "reading the controls topic failed (%s): the controls in force stay as "
                    "they are; retrying",
                    type(exc).__name__,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), _RETRY_S)

    async def _read(self, wait_ms: int) -> None:
        fetched: Mapping[TopicPartition, Sequence[Any]] = await self._consumer.getmany(
            *self._partitions, timeout_ms=wait_ms
        )
        changed = False
        for tp, messages in fetched.items():
            for message in messages:
                changed |= self._apply(tp, message)
        if changed:
            self._export()

    def _apply(self, tp: TopicPartition, message: Any) -> bool:
        if message.value is None:  # a tombstone from compaction tooling: nothing to lift
            return False
        try:
            control = parse_control(message.value)
        except RejectedEvent as exc:
            # Only the console writes here; a bad record is a bug or a stray producer, not
            # an event to score: it is skipped (every worker reads it, so no dead letter).
            self.metrics.controls.labels("invalid").inc()
            log.error(
                "controls topic %s partition %d offset %d: record ignored (%s: %s)",
                tp.topic,
                tp.partition,
                message.offset,
                exc.reason.value,
                exc.detail,
            )
            return False
        self.current = self.current.updated(control)
        self.metrics.controls.labels("applied").inc()
        log.info(
            "control %s %s by %s",
            control.key,
            "in force" if control.active else "lifted",
            control.changed_by,
        )
        return True

    def _export(self) -> None:
        for kind, count in self.current.counts().items():
            self.metrics.controls_in_force.labels(kind).set(count)

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stopping.set()

    async def close(self) -> None:
        """Close the consumer."""
        if self._started:
            await self._consumer.stop()
