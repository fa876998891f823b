"""Kafka outputs: the messages the worker publishes, and how they reach the broker."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2


@functools.lru_cache(maxsize=1 << 16)
def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a key (murmur2, like Java)."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True)
class Output:
    """One message to publish."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int | None = None


class Publisher:
    """Publishes outputs in one batch per topic partition.

    Building ``BatchBuilder`` objects directly skips aiokafka's per-message ``send()``
    bookkeeping: each partition's outputs are serialised once, with one future for all.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def send(self, outputs: Sequence[Output]) -> list[asyncio.Future[Any]]:
        """Queue every output; the futures resolve when the broker acknowledges them.

        Raises:
            KafkaError: an output could not even be queued.
        """
        groups: dict[tuple[str, int], list[Output]] = {}
        for output in outputs:
            groups.setdefault((output.topic, output.partition), []).append(output)
        futures: list[asyncio.Future[Any]] = []
        for (topic, partition), items in groups.items():
            batch = self.producer.create_batch()
            for item in items:
                if self._append(batch, item):
                    continue
                # Full: ship it and start another.
                futures.append(await self.producer.send_batch(batch, topic, partition=partition))
                batch = self.producer.create_batch()
                if not self._append(batch, item):
                    raise KafkaError(f"a {len(item.value)}-byte message exceeds the batch size")
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        return futures

    @staticmethod
    def _append(batch: Any, item: Output) -> bool:
        metadata = batch.append(
            key=item.key, value=item.value, timestamp=item.timestamp_ms, headers=item.headers
        )
        return metadata is not None

    async def publish(self, outputs: Sequence[Output]) -> None:
        """Send every output and wait until all are acknowledged.

        Raises:
            KafkaError: some output was not acknowledged (others may have been: the caller
                re-sends all, which is safe as consumers dedupe by transaction id). Raised
                once every send has settled: none is still in flight (and retrying) when a
                transaction is aborted, where it could land after the abort marker.
        """
        results = await asyncio.gather(*await self.send(outputs), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
