"""The event-time merge of the partitions a worker reads (:class:`EventTimeMerge`).

aiokafka's ``getmany`` drains one partition's whole fetch (up to a megabyte) before the
next. Catching up on a backlog, one partition would then run ahead of the others in event
time, and terminal windows, which count the transactions of every partition, would miss
some. So each partition's messages are validated and buffered here (up to a batch each),
and a batch takes the earliest by event time: a k-way merge in which each partition
contributes a prefix, so committed offsets stay contiguous. Live, partitions are caught up,
nothing waits, and this is simply arrival order.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_app.config import Settings
from stream_app.records import ValidationLimits
from stream_app.scoring.pipeline import Accepted, Inbound, Rejected, validate_transaction
from stream_app.worker.offsets import position_now

# Buffered records older than this mean a backlog: then partitions are kept abreast in
# event time, a batch ends where a partition runs dry, and the next one waits up to
# _CATCH_UP_WAIT_MS for that partition's fetch (a few ms unless the machine is starved).
_CATCH_UP_AGE_MS: Final = 1000
_CATCH_UP_WAIT_MS: Final = 500
_ALIGN_STEP_S: Final = 0.002


@dataclass(frozen=True, slots=True)
class Polled:
    """A consumed message, validated, waiting in its partition's buffer."""

    tp: TopicPartition
    outcome: Accepted | Rejected
    event_time: float | None  # seconds; None for a rejected message


def merge_key(before: float | None, current: float | None, after: float | None) -> float:
    """Where a partition's head record goes in the event-time merge of partitions.

    ``current`` is the head's event time, ``before`` the key of the record taken before it
    from the same partition, ``after`` the event time of the record behind it (None when
    unknown: not buffered yet, or a rejected message). The key is the median of the three:
    an event far ahead of its neighbours (or far behind) does not move its partition, it
    is taken in its partition's order, with its neighbours. A partition that really jumps
    ahead (a quiet night) moves as soon as the record behind the jump confirms it. A
    running maximum, what this replaces, let one event dated a day ahead push its whole
    partition behind every other one (with it, every transaction of the partition was
    scored after the others' backlog, and their terminal windows missed them).

    Taking a record early never changes another customer's features (terminal windows
    end days before the transaction that reads them); taking it late does. So a record
    whose place cannot be told yet (the last one buffered) is held at its predecessor's
    key, or taken at once when there is none, never keyed by its own, unconfirmed time.

    Sorted event times keep their own time as key:

    >>> merge_key(10.0, 11.0, 12.0)
    11.0

    An outlier, ahead or behind, takes its neighbours' place:

    >>> merge_key(10.0, 90_000.0, 12.0), merge_key(10.0, 1.0, 12.0)
    (12.0, 10.0)

    At the head of a backlog the record behind decides; at the end of what is buffered
    the predecessor holds the key back; alone, or rejected, a record goes at once:

    >>> merge_key(None, 90_000.0, 12.0), merge_key(10.0, 90_000.0, None)
    (12.0, 10.0)
    >>> merge_key(None, 90_000.0, None), merge_key(10.0, None, 12.0)
    (-inf, 10.0)
    """
    if current is None:
        return before if before is not None else -math.inf
    if after is None:
        return min(current, before) if before is not None else -math.inf
    if before is None:
        return min(current, after)
    return max(min(before, current), min(max(before, current), after))


class EventTimeMerge:
    """The records fetched but not yet taken into a batch, by partition, and the order in
    which batches take them (see the module's docstring).

    Transactions are buffered validated, with their event times; labels as they came
    (validated when applied). A rebalance drops the buffers (:meth:`forget`): positions go
    back to the committed offsets, and what was buffered is read again.
    """

    def __init__(self, consumer: AIOKafkaConsumer, settings: Settings, limits: ValidationLimits):
        self.consumer = consumer
        self.settings = settings
        self.limits = limits
        self._buffered: dict[TopicPartition, deque[Polled]] = {}  # transactions
        self._labels_buffered: dict[TopicPartition, deque[Inbound]] = {}
        self._clocks: dict[TopicPartition, float] = {}  # merge key of the last record taken
        self._drained_at: dict[TopicPartition, float] = {}  # epoch ms, by partition

    async def poll(
        self, timeout_ms: int, *, labels_only: bool = False
    ) -> tuple[list[Polled], list[Inbound]]:
        """Up to a batch of validated transactions, the earliest events first across
        partitions, and the labels fetched meanwhile (up to a batch per partition); with
        ``labels_only``, labels alone (see :mod:`stream_app.worker.labels_backlog`).

        A partition's place in the merge is its head's :func:`merge_key`, which one event
        far ahead of (or behind) its neighbours cannot move. While catching up, a batch
        also ends where a partition runs dry, and the next one first waits for that
        partition's fetch (:meth:`_align`).

        Labels take no part in the merge: they change terminal counters, which a batch's
        transactions read after its labels are applied, whatever their event times.
        """
        size = self.settings.batch_size
        labels_topic = self.settings.topic_labels
        assignment = self.consumer.assignment()
        for tp in list(self._buffered):
            if tp not in assignment:
                del self._buffered[tp]
                self._drained_at.pop(tp, None)
        for tp in list(self._labels_buffered):
            if tp not in assignment:
                del self._labels_buffered[tp]
        wanted = [tp for tp in assignment if not labels_only or tp.topic == labels_topic]
        for tp in wanted:
            buffers = self._labels_buffered if tp.topic == labels_topic else self._buffered
            room = size - len(buffers.get(tp, ()))
            if room > 0:
                self._buffer(await self.consumer.getmany(tp, timeout_ms=0, max_records=room))
        waiting = [
            *self._labels_buffered.values(),
            *([] if labels_only else self._buffered.values()),
        ]
        if timeout_ms and not any(waiting):
            if wanted:
                fetched = await self.consumer.getmany(
                    *wanted, timeout_ms=timeout_ms, max_records=size
                )
                self._buffer(fetched)
            else:  # no labels partition here: the other members apply them
                await asyncio.sleep(timeout_ms / 1000)
        # Every label buffered (at most a batch per partition): none waits behind another
        # partition's, and labels are a few percent of the volume.
        labels = [label for buffer in self._labels_buffered.values() for label in buffer]
        self._labels_buffered.clear()
        if labels_only:
            return [], labels
        catching_up = self._catching_up()
        if catching_up:
            await self._align([tp for tp in assignment if tp.topic != labels_topic])
        heads = [
            (self._head_key(tp, buffer), i, tp)
            for i, (tp, buffer) in enumerate(self._buffered.items())
            if buffer
        ]
        heapq.heapify(heads)
        taken: list[Polled] = []
        while heads and len(taken) < size:
            key, i, tp = heapq.heappop(heads)
            buffer = self._buffered[tp]
            taken.append(buffer.popleft())
            self._clocks[tp] = key
            if buffer:
                heapq.heappush(heads, (self._head_key(tp, buffer), i, tp))
            else:
                self._drained_at[tp] = time.time() * 1000
                if catching_up:
                    # Its next records are still on the broker: going on with the other
                    # partitions alone would run ahead of them. The next poll waits.
                    break
        return taken, labels

    def _head_key(self, tp: TopicPartition, buffer: deque[Polled]) -> float:
        """The merge key of a partition's head record (see :func:`merge_key`)."""
        after = buffer[1].event_time if len(buffer) > 1 else None
        return merge_key(self._clocks.get(tp), buffer[0].event_time, after)

    def _buffer(self, fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Buffer fetched records: labels as they came (validated when applied),
        transactions validated, with their event times for the merge."""
        limits = self.limits
        labels_topic = self.settings.topic_labels
        for tp, records in fetched.items():
            if tp.topic == labels_topic:
                self._labels_buffered.setdefault(tp, deque()).extend(
                    Inbound(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                    for r in records
                )
                continue
            buffer = self._buffered.setdefault(tp, deque())
            for r in records:
                message = Inbound(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                outcome = validate_transaction(message, limits)
                event_time = outcome.event.event_time_s if isinstance(outcome, Accepted) else None
                buffer.append(Polled(tp, outcome, event_time))

    def _catching_up(self) -> bool:
        """Whether the buffered records are old: a backlog, not live traffic."""
        heads = [b[0].outcome.message.timestamp_ms for b in self._buffered.values() if b]
        return bool(heads) and time.time() * 1000 - min(heads) > _CATCH_UP_AGE_MS

    async def _align(self, assignment: Iterable[TopicPartition]) -> None:
        """Give partitions that may have unread records a moment to fill their buffers.

        Only while catching up: a partition with records on the broker but none here yet
        (its fetch is in flight) would let the others run ahead in event time. Live, the
        records are fresh, nothing waits, and latency is untouched.
        """
        deadline = time.monotonic() + _CATCH_UP_WAIT_MS / 1000
        while time.monotonic() < deadline:
            behind = [
                tp for tp in assignment if not self._buffered.get(tp) and await self._has_unread(tp)
            ]
            if not behind:
                return
            for tp in behind:
                room = self.settings.batch_size
                self._buffer(await self.consumer.getmany(tp, timeout_ms=0, max_records=room))
            await asyncio.sleep(_ALIGN_STEP_S)

    async def _has_unread(self, tp: TopicPartition) -> bool:
        """Whether the broker may hold records of ``tp`` that we have not received.

        The high watermark is as of the partition's last fetch, and a partition is not
        fetched while records of it wait in a buffer: after we drain it, its watermark is
        stale until the next fetch answers, and then it counts as possibly behind.
        """
        if tp not in self.consumer.assignment():  # revoked while _align awaited
            return False
        highwater = self.consumer.highwater(tp)
        if highwater is None:
            # No fetch answered yet (its position was just sought): it may hold days of
            # events, and the others must not run ahead of it; waited for, at most
            # _CATCH_UP_WAIT_MS per batch.
            return True
        fetched_at = self.consumer.last_poll_timestamp(tp) or 0
        if fetched_at <= self._drained_at.get(tp, -1.0):
            return True
        position = await position_now(self.consumer, tp)
        return position is not None and position < highwater

    def holds(self, tp: TopicPartition) -> bool:
        """Whether records of ``tp`` wait in a buffer."""
        return bool(self._buffered.get(tp) or self._labels_buffered.get(tp))

    def take(self, partitions: Iterable[TopicPartition]) -> tuple[list[Polled], list[Inbound]]:
        """Empty the buffers of ``partitions``: what they held, to be processed at once."""
        partitions = list(partitions)
        taken = [polled for tp in partitions for polled in self._buffered.pop(tp, ())]
        labels = [label for tp in partitions for label in self._labels_buffered.pop(tp, ())]
        return taken, labels

    def forget_clock(self, tp: TopicPartition) -> None:
        """Forget where ``tp`` stands in event time (its position was moved)."""
        self._clocks.pop(tp, None)

    def forget(self) -> None:
        """Drop records polled but not yet taken (on a rebalance: they will be re-read)."""
        self._buffered.clear()
        self._labels_buffered.clear()
        self._clocks.clear()
        self._drained_at.clear()
