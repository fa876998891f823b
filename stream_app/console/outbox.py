"""Publishes what the store's outboxes hold: verdicts' labels, and operators' controls.

A fraud or legitimate verdict stores its ``Label`` in the same transaction as the verdict
(:meth:`~stream_app.console.store.CaseStore.record_verdict`), and a supervisor's list entry
or threshold override stores its ``Control`` with its audit entry
(:meth:`~stream_app.console.store.CaseStore.record_control`). A publisher sends what is
pending, waits for the broker's acknowledgement, then marks it sent. A broker outage delays
them but loses none; a crash between the acknowledgement and the mark sends one twice,
which is harmless: the worker takes a label as the same verdict again (the latest by
``reported_at`` wins, and it is the same), and a control as the same state of its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from aiokafka import AIOKafkaProducer
from prometheus_client import Counter

from stream_app.config import Settings
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.store import CaseStore
from stream_app.kafka import config as kafka_config

log = logging.getLogger(__name__)

# Pending labels are looked for this often even when no verdict wakes the publisher (one
# left by a broker outage or by another console replica).
_SWEEP_INTERVAL_S: Final = 2.0
_RETRY_MAX_S: Final = 10.0


class _Pending(Protocol):
    @property
    def message_id(self) -> str: ...
    @property
    def key(self) -> bytes: ...
    @property
    def payload(self) -> bytes: ...


class OutboxPublisher:
    """Sends one outbox's pending messages to ``topic`` until :meth:`stop`.

    Args:
        settings: The worker's settings: the Kafka connection.
        topic: Where the messages go.
        pending: Reads the oldest pending messages (called in a thread).
        mark_sent: Marks messages acknowledged, by id (called in a thread).
        published: Counts messages acknowledged.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        pending: Callable[[], Sequence[_Pending]],
        mark_sent: Callable[[Sequence[str]], None],
        published: Counter,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self._pending = pending
        self._mark_sent = mark_sent
        self._published = published
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Publish now (a message was just stored); safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def stop(self) -> None:
        """Ask :meth:`run` to finish; messages still pending stay in the outbox."""
        self._stopping = True
        self.wake()

    async def run(self) -> None:
        """Publish pending messages whenever woken, and every few seconds."""
        self._loop = asyncio.get_running_loop()
        producer = AIOKafkaProducer(**kafka_config.producer_kwargs(self.settings))
        await producer.start()
        pause = 0.5
        try:
            while not self._stopping:
                try:
                    await self.publish_pending(producer)
                    pause = 0.5
                except Exception as exc:  # broker or store down: the outbox keeps them
                    log.error(
                        "cannot publish to %s (%s); retrying in %.1f s",
                        self.topic,
                        type(exc).__name__,
                        pause,
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RETRY_MAX_S)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=_SWEEP_INTERVAL_S)
        finally:
            await producer.stop()

    async def publish_pending(self, producer: AIOKafkaProducer) -> int:
        """Send every pending message, wait for the acknowledgements, mark them sent."""
        sent = 0
        while True:
            pending = await asyncio.to_thread(self._pending)
            if not pending:
                return sent
            futures = [await producer.send(self.topic, p.payload, key=p.key) for p in pending]
            await asyncio.gather(*futures)
            await asyncio.to_thread(self._mark_sent, [p.message_id for p in pending])
            self._published.inc(len(pending))
            sent += len(pending)
            log.info("published %d messages on %s", len(pending), self.topic)


def label_publisher(
    settings: Settings, store: CaseStore, metrics: ConsoleMetrics
) -> OutboxPublisher:
    """Verdicts' labels, keyed by customer id like every label, to ``topic_labels``."""
    return OutboxPublisher(
        settings,
        settings.topic_labels,
        store.pending_labels,
        store.mark_labels_sent,
        metrics.labels_published,
    )


def control_publisher(
    settings: Settings, store: CaseStore, metrics: ConsoleMetrics
) -> OutboxPublisher:
    """Operators' controls, keyed by their key (the topic is compacted), to
    ``topic_controls``."""
    return OutboxPublisher(
        settings,
        settings.topic_controls,
        store.pending_controls,
        store.mark_controls_sent,
        metrics.controls_published,
    )
