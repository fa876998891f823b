"""The consumer lag gauges, refreshed on a timer of their own (:class:`LagReporter`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream_app.metrics import WorkerMetrics
from stream_app.worker.offsets import Offsets

log = logging.getLogger(__name__)

# The lag gauges are refreshed this often from the brokers' end offsets: one ListOffsets
# and, before the first commit, one OffsetFetch request a second.
_LAG_REFRESH_S: Final = 1.0


class LagReporter:
    """One lag gauge per partition the group reads: its end offset minus the position
    processed (:attr:`Offsets.processed`, else the group's committed offset)."""

    def __init__(self, consumer: AIOKafkaConsumer, metrics: WorkerMetrics, offsets: Offsets):
        self.consumer = consumer
        self.metrics = metrics
        self.offsets = offsets
        self._failing = False

    async def run_forever(self, also: Callable[[], Awaitable[None]]) -> None:
        """Refresh the lag gauges on a timer of their own, from the brokers' end offsets
        (and run ``also`` first on each tick: the output topics' watch).

        The batch loop can be stuck for minutes (a Redis outage: it retries one batch) while
        producers keep writing. The lag must keep growing then, or the lag and no-commit
        alerts cannot fire; the high watermark of the last fetch stops moving when the loop
        stops polling, so the end offsets are asked of the brokers (ListOffsets), and the
        lag is what they hold past this group's committed position.
        """
        while True:
            await asyncio.sleep(_LAG_REFRESH_S)
            try:
                await also()
                await self.report()
            except KafkaError as exc:
                self.metrics.kafka_errors.labels("admin").inc()
                if not self._failing:  # once per streak: the loop reports the outage
                    log.warning("cannot read the end offsets for the lag gauges (%s)", exc)
                self._failing = True
            else:
                self._failing = False

    async def report(self) -> None:
        """Lag of each assigned partition: its end offset minus the committed position."""
        assignment = sorted(self.consumer.assignment())
        if not assignment:
            return
        # Positions first, end offsets after: an end offset is then never older than the
        # position it is compared with, and a position past the end is a real anomaly.
        positions = dict(self.offsets.processed)
        starts: list[TopicPartition] = []
        for tp in assignment:
            if tp in positions:
                continue
            committed = await self.consumer.committed(tp)
            if committed is not None and committed >= 0:
                positions[tp] = committed
            else:
                starts.append(tp)
        if starts:
            positions.update(await self.consumer.beginning_offsets(starts))
        ends = await self.offsets.end_offsets(assignment)
        owned = self.consumer.assignment()
        for tp, end in ends.items():
            position = positions.get(tp)
            if tp not in owned or position is None:  # revoked meanwhile
                continue
            if position > end:
                self.offsets.out_of_range.setdefault(tp, position)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(end - position, 0)
            )

    def forget(self, tp: TopicPartition) -> None:
        """Drop the gauge of a partition revoked from this worker."""
        with contextlib.suppress(KeyError):
            self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
