"""Publishes verdicts as ``Label`` records on the labels topic, from the store's outbox.

A fraud or legitimate verdict stores its label in the same transaction as the verdict
(:meth:`~stream_app.console.store.CaseStore.record_verdict`); this publisher sends what is
pending, keyed by customer id like every label, waits for the broker's acknowledgement, then
marks it sent. A broker outage delays labels but loses none; a crash between the
acknowledgement and the mark sends a label twice, which the worker takes as the same
verdict again (the latest by ``reported_at`` wins, and it is the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from aiokafka import AIOKafkaProducer

from stream_app import kafka_config
from stream_app.config import Settings
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.store import CaseStore

log = logging.getLogger(__name__)

# Pending labels are looked for this often even when no verdict wakes the publisher (one
# left by a broker outage or by another console replica).
_SWEEP_INTERVAL_S: Final = 2.0
_RETRY_MAX_S: Final = 10.0


class LabelPublisher:
    """Sends the store's pending labels to ``settings.topic_labels`` until :meth:`stop`.

    Args:
        settings: The worker's settings: Kafka connection and ``topic_labels``.
        store: Holds the label outbox.
        metrics: Counts labels acknowledged.
    """

    def __init__(self, settings: Settings, store: CaseStore, metrics: ConsoleMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Publish now (a verdict was just stored); safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def stop(self) -> None:
        """Ask :meth:`run` to finish; labels still pending stay in the outbox."""
        self._stopping = True
        self.wake()

    async def run(self) -> None:
        """Publish pending labels whenever woken, and every few seconds."""
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
                        "cannot publish labels (%s); retrying in %.1f s",
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
        """Send every pending label, wait for the acknowledgements, mark them sent."""
        sent = 0
        while True:
            pending = await asyncio.to_thread(self.store.pending_labels)
            if not pending:
                return sent
            futures = [
                await producer.send(self.settings.topic_labels, p.payload, key=p.key)
                for p in pending
            ]
            await asyncio.gather(*futures)
            await asyncio.to_thread(self.store.mark_labels_sent, [p.verdict_id for p in pending])
            self.metrics.labels_published.inc(len(pending))
            sent += len(pending)
            log.info("published %d labels on %s", len(pending), self.settings.topic_labels)
