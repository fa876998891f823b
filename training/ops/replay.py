"""``fraudstream replay``: publish a transactions file to Kafka as a live stream would.

Rows go out in event-time order (``TX_DATETIME``, then ``TRANSACTION_ID``), each as the
``TransactionEvent`` JSON of :func:`stream_app.records.transaction_json`, keyed by customer
id, at a set rate or as fast as the producer goes. With a label delay, each fraud's label
is published when it would become known (event time + delay), interleaved in event-time
order with the transactions; genuine transactions get a label too with ``all_labels``.

Only frauds are labelled by default: the worker's terminal counters count frauds, and a
genuine label changes no state, so sending one per transaction would only multiply the
traffic by two. The record timestamp (CreateTime) is the publishing time, so the worker's
end-to-end latency is measured from when the replay produced the event, not from 2018.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stream_app.config import Settings
from stream_app.errors import ConfigError
from stream_app.kafka import config as kafka_config
from stream_app.records import label_json, transaction_json
from training.transactions import to_arrays

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
# Futures awaited at once: bounds the memory of an unthrottled replay of a large file.
_MAX_IN_FLIGHT: Final = 20_000
# A paced replay sends in slices this long, so a high rate is not one sleep per message.
_PACE_SLICE_S: Final = 0.01
_REPLAY_LINGER_MS: Final = 5


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s`` or plain seconds, as a timedelta.

    >>> parse_duration("7d")
    datetime.timedelta(days=7)
    >>> parse_duration("1.5h")
    datetime.timedelta(seconds=5400)
    """
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"{text!r} is not a duration: use e.g. 7d, 12h, 30m or 45s")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])


@dataclass(frozen=True, slots=True)
class ReplayMessage:
    """One message to publish, in replay order."""

    topic: str
    key: bytes
    value: bytes
    is_label: bool


def replay_order(frame: pd.DataFrame) -> npt.NDArray[np.int64]:
    """Row positions in event-time order: ``TX_DATETIME``, then ``TRANSACTION_ID``."""
    arrays = to_arrays(frame)
    order: npt.NDArray[np.int64] = np.lexsort((arrays.transaction_ids, arrays.times_ms))
    return order.astype(np.int64)


def replay_messages(
    frame: pd.DataFrame,
    *,
    transactions_topic: str,
    labels_topic: str,
    labels_delay: timedelta | None = None,
    all_labels: bool = False,
    limit: int | None = None,
) -> Iterator[ReplayMessage]:
    """The transactions (and labels) of a table, merged in event-time order.

    At equal times a label goes before a transaction: it was known by then.
    """
    arrays = to_arrays(frame)
    order = replay_order(frame)
    if limit is not None:
        order = order[:limit]
    tx_ids = arrays.transaction_ids[order].tolist()
    customers = arrays.customer_ids[order].tolist()
    terminals = arrays.terminal_ids[order].tolist()
    times = arrays.times_ms[order].tolist()
    amounts = arrays.amounts[order].tolist()
    frauds = arrays.is_fraud[order].astype(bool).tolist()
    delay_ms = None if labels_delay is None else int(labels_delay.total_seconds() * 1000)
    # Labels due, as (reported_ms, transaction_id, row); reported in order of transactions,
    # so a heap keeps them sorted even with a fixed delay and ties.
    due: list[tuple[int, int, int]] = []

    def label(row: int) -> ReplayMessage:
        reported = times[row] + (delay_ms or 0)
        value = label_json(
            tx_ids[row], customers[row], terminals[row], times[row], frauds[row], reported
        )
        return ReplayMessage(labels_topic, str(customers[row]).encode(), value, True)

    for row in range(len(order)):
        while due and due[0][0] <= times[row]:
            yield label(heapq.heappop(due)[2])
        yield ReplayMessage(
            transactions_topic,
            str(customers[row]).encode(),
            transaction_json(tx_ids[row], customers[row], terminals[row], times[row], amounts[row]),
            False,
        )
        if delay_ms is not None and (frauds[row] or all_labels):
            heapq.heappush(due, (times[row] + delay_ms, tx_ids[row], row))
    while due:
        yield label(heapq.heappop(due)[2])


@dataclass
class ReplayStats:
    """What a replay published."""

    transactions: int = 0
    labels: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Transactions per second achieved."""
        return self.transactions / self.seconds if self.seconds > 0 else 0.0


async def ensure_input_topics(settings: Settings) -> None:
    """Create the transactions and labels topics when missing (the worker's partitions)."""
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, settings.topic_partitions, settings.topic_replication_factor)
            for name in (settings.topic_transactions, settings.topic_labels)
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile
                await admin.create_topics(missing)
    finally:
        await admin.close()


async def replay(
    messages: Iterator[ReplayMessage],
    settings: Settings,
    *,
    rate: float = 0.0,
    on_progress: Callable[[ReplayStats], None] | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayStats:
    """Publish ``messages`` in order; returns once every one is acknowledged.

    Args:
        messages: What to publish (:func:`replay_messages`).
        settings: Bootstrap servers, security and producer options.
        rate: Transactions per second; 0 for as fast as possible. Labels ride along.
        on_progress: Called after each slice with the running totals.
        stop: When set, publishing stops after the current slice.
    """
    if rate < 0:
        raise ConfigError(f"--rate must be 0 (as fast as possible) or positive, got {rate}")
    await ensure_input_topics(settings)
    options = kafka_config.producer_kwargs(settings)
    if not rate:
        # Flat out, one send() per message: a few ms of linger lets requests fill up. A
        # paced replay sends small slices, which linger would only delay (and the
        # worker's latency is measured from the record's creation).
        options["linger_ms"] = max(options["linger_ms"], _REPLAY_LINGER_MS)
    producer = AIOKafkaProducer(**options)
    await producer.start()
    stats = ReplayStats()
    started = time.perf_counter()
    in_flight: list[asyncio.Future[object]] = []
    slice_size = max(1, int(rate * _PACE_SLICE_S)) if rate else 1000
    try:
        exhausted = False
        while not exhausted and not (stop is not None and stop.is_set()):
            sent_tx = 0
            while sent_tx < slice_size:
                message = next(messages, None)
                if message is None:
                    exhausted = True
                    break
                in_flight.append(await producer.send(message.topic, message.value, key=message.key))
                if message.is_label:
                    stats.labels += 1
                else:
                    stats.transactions += 1
                    sent_tx += 1
            if len(in_flight) >= _MAX_IN_FLIGHT:
                await asyncio.gather(*in_flight)
                in_flight.clear()
            stats.seconds = time.perf_counter() - started
            if on_progress is not None:
                on_progress(stats)
            if rate:
                ahead = stats.transactions / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            else:
                await asyncio.sleep(0)
        await asyncio.gather(*in_flight)
    finally:
        await producer.stop()
    stats.seconds = time.perf_counter() - started
    if on_progress is not None:
        on_progress(stats)
    return stats
