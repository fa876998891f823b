"""The consumers: every ``ScoreRecord`` on the alerts topic opens a case; every one on the
scores topic joins the customer's and terminal's history (when history is kept).

Each reads with its own consumer group (``<FRAUDSTREAM_GROUP_ID>.console`` and
``.console-history``), so it never takes partitions from the worker, and commits a batch's
offsets only after the store has written it: a crash in between re-reads the batch, and
since rows are keyed by transaction id, a re-read alert is not a second case.

Error policy: a record that is no valid ``ScoreRecord`` is logged with its topic, partition
and offset (never its content: it holds customer data) and counted, then skipped; it cannot
stop the consumer. A store that cannot be written is retried, with a growing pause, without
committing, until it can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Final

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from stream_app.config import Settings
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.store import CaseStore
from stream_app.kafka import config as kafka_config
from stream_app.records import ScoreRecord

log = logging.getLogger(__name__)

_POLL_TIMEOUT_MS: Final = 500
_MAX_BATCH: Final = 1000
_RETRY_MAX_S: Final = 10.0


def console_group_id(settings: Settings) -> str:
    """The console's consumer group on the alerts topic."""
    return f"{settings.group_id}.console"


def parse_alerts(
    records: Sequence[ConsumerRecord[bytes, bytes]],
) -> tuple[list[ScoreRecord], int]:
    """The valid alerts of a batch, and how many records were not valid ``ScoreRecord``s."""
    alerts: list[ScoreRecord] = []
    invalid = 0
    for record in records:
        try:
            if record.value is None:
                raise ValueError("empty value")
            alerts.append(ScoreRecord.from_json(record.value))
        except (ValidationError, ValueError) as exc:
            invalid += 1
            # the error's kind and field only: pydantic's text would echo the values
            kind = (
                f"{exc.errors()[0]['type']} at {exc.errors()[0]['loc']}"
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            log.warning(
                "skipped an invalid alert at %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                kind,
            )
    return alerts, invalid


class TopicIngest:
    """Consumes a topic of ``ScoreRecord``s into the case store until :meth:`stop`.

    Subclasses say which topic, which consumer group, and what writing a batch means.

    Args:
        settings: The worker's settings: Kafka connection, topic names, ``group_id``.
        store: Where the records go.
        metrics: Counts records by outcome.
    """

    def __init__(self, settings: Settings, store: CaseStore, metrics: ConsoleMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()

    topic: str
    group_id: str

    def write(self, records: list[ScoreRecord]) -> int:
        """Store a batch (called in a thread); returns how many records were new."""
        raise NotImplementedError

    def count(self, new: int, duplicate: int, invalid: int) -> None:
        """Count a stored batch."""

    def stop(self) -> None:
        """Ask :meth:`run` to finish after its current batch."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume, store, commit, until stopped."""
        if not await self._topics_ready():
            return
        kwargs = kafka_config.consumer_kwargs(self.settings, self.group_id)
        kwargs["max_poll_records"] = _MAX_BATCH
        consumer = AIOKafkaConsumer(self.topic, **kwargs)
        await consumer.start()
        log.info("consuming %s as group %s", self.topic, self.group_id)
        self.started.set()
        try:
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS)
                records = [r for partition in batch.values() for r in partition]
                if not records:
                    continue
                valid, invalid = parse_alerts(records)
                new = await self._store(valid)
                if new is None:
                    return  # stopped while the store was down: nothing committed
                await consumer.commit()
                self.count(new, len(valid) - new, invalid)
        finally:
            await consumer.stop()

    async def _topics_ready(self) -> bool:
        """Make sure the worker's topics exist, as the worker does at its start-up
        (:func:`~stream_app.kafka.config.ensure_topics`), so a console started before the
        worker waits for no one. A broker that does not answer is waited for; a topic that
        may not be created raises :class:`~stream_app.errors.ConfigError`. False if stopped.
        """
        pause = 0.5
        while not self._stopping.is_set():
            try:
                await kafka_config.ensure_topics(self.settings)
                return True
            except KafkaError as exc:
                log.warning(
                    "cannot reach Kafka at FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS=%s (%s); "
                    "retrying in %.1f s",
                    self.settings.kafka_bootstrap_servers,
                    type(exc).__name__,
                    pause,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
            pause = min(pause * 2, _RETRY_MAX_S)
        return False

    async def _store(self, records: list[ScoreRecord]) -> int | None:
        """Write the records, retrying until the store takes them; None if stopped first."""
        pause = 0.5
        while True:
            try:
                return await asyncio.to_thread(self.write, records)
            except Exception as exc:  # the database is down or refuses: retry, never skip
                log.error(
                    "cannot write %d records of %s to the case store (%s); retrying in %.1f s",
                    len(records),
                    self.topic,
                    type(exc).__name__,
                    pause,
                )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
                return None
            except TimeoutError:
                pause = min(pause * 2, _RETRY_MAX_S)


class AlertIngest(TopicIngest):
    """The alerts topic: each alert not seen before opens a case."""

    def __init__(self, settings: Settings, store: CaseStore, metrics: ConsoleMetrics) -> None:
        super().__init__(settings, store, metrics)
        self.topic = settings.topic_alerts
        self.group_id = console_group_id(settings)

    def write(self, records: list[ScoreRecord]) -> int:
        return self.store.add_alerts(records)

    def count(self, new: int, duplicate: int, invalid: int) -> None:
        self.metrics.alerts.labels("opened").inc(new)
        self.metrics.alerts.labels("duplicate").inc(duplicate)
        self.metrics.alerts.labels("invalid").inc(invalid)


class HistoryIngest(TopicIngest):
    """The scores topic: every scored transaction, kept a while for the case view's
    timelines of a customer and a terminal (its own group, so alerts never wait for it)."""

    def __init__(self, settings: Settings, store: CaseStore, metrics: ConsoleMetrics) -> None:
        super().__init__(settings, store, metrics)
        self.topic = settings.topic_scores
        self.group_id = f"{settings.group_id}.console-history"

    def write(self, records: list[ScoreRecord]) -> int:
        return self.store.add_scores(records)

    def count(self, new: int, duplicate: int, invalid: int) -> None:
        self.metrics.history.inc(new)
