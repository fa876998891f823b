"""The alerts consumer: every ``ScoreRecord`` on the alerts topic opens a case.

It reads with its own consumer group (``<FRAUDSTREAM_GROUP_ID>.console``), so it never
takes partitions from the worker, and commits a batch's offsets only after the store has
written its cases: a crash in between re-reads the batch, and since cases are keyed by
transaction id, a re-read alert is not a second case.

Error policy: a record that is no valid ``ScoreRecord`` is logged with its topic, partition
and offset (never its content: it holds customer data) and counted, then skipped; it cannot
stop the consumer. A store that cannot be written is retried, with a growing pause, without
committing, until it can be.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Final

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from pydantic import ValidationError

from stream_app import kafka_config
from stream_app.config import Settings
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.store import CaseStore
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


class AlertIngest:
    """Consumes the alerts topic into the case store until :meth:`stop`.

    Args:
        settings: The worker's settings: Kafka connection, ``topic_alerts``, ``group_id``.
        store: Where cases are opened.
        metrics: Counts alerts by outcome.
    """

    def __init__(self, settings: Settings, store: CaseStore, metrics: ConsoleMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to finish after its current batch."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume, store, commit, until stopped."""
        kwargs = kafka_config.consumer_kwargs(self.settings, console_group_id(self.settings))
        kwargs["max_poll_records"] = _MAX_BATCH
        consumer = AIOKafkaConsumer(self.settings.topic_alerts, **kwargs)
        await consumer.start()
        log.info(
            "consuming %s as group %s", self.settings.topic_alerts, console_group_id(self.settings)
        )
        self.started.set()
        try:
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS)
                records = [r for partition in batch.values() for r in partition]
                if not records:
                    continue
                alerts, invalid = parse_alerts(records)
                opened = await self._store(alerts)
                if opened is None:
                    return  # stopped while the store was down: nothing committed
                await consumer.commit()
                self.metrics.alerts.labels("opened").inc(opened)
                self.metrics.alerts.labels("duplicate").inc(len(alerts) - opened)
                self.metrics.alerts.labels("invalid").inc(invalid)
        finally:
            await consumer.stop()

    async def _store(self, alerts: list[ScoreRecord]) -> int | None:
        """Write the alerts, retrying until the store takes them; None if stopped first."""
        pause = 0.5
        while True:
            try:
                return await asyncio.to_thread(self.store.add_alerts, alerts)
            except Exception as exc:  # the database is down or refuses: retry, never skip
                log.error(
                    "cannot write %d alerts to the case store (%s); retrying in %.1f s",
                    len(alerts),
                    type(exc).__name__,
                    pause,
                )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
                return None
            except TimeoutError:
                pause = min(pause * 2, _RETRY_MAX_S)
