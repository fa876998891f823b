"""Whether this worker still owns what it polled: the rebalance listener, the stall
watchdog and the check made before a batch is committed (:class:`Membership`).

The broker's own fence (:mod:`stream_app.kafka.fencing`) refuses offsets sent with a stale
group generation; this module is the worker's side of it, which needs no round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from stream_app.config import Settings
from stream_app.kafka.fencing import group_metadata
from stream_app.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# The stall watchdog's tick; a gap between ticks longer than half the consumer session
# means heartbeats stopped long enough for the group to evict this member.
_WATCHDOG_TICK_S: Final = 0.1


class StaleBatch(Exception):
    """A batch that must not be committed: this worker stalled (or the batch took longer
    than the consumer session), so the group may have given its partitions to another
    member, which re-does the batch from the last commit."""


class Membership:
    """The consumer's group membership as the loop sees it: the group generation (read
    when needed), the rebalances run so far, and the stalls of the event loop."""

    def __init__(self, consumer: AIOKafkaConsumer, settings: Settings) -> None:
        self.settings = settings
        # The group generation and member id, read when needed (see check).
        self.group = group_metadata(consumer)
        # Rebalance callbacks run so far: a batch polled before one must not be processed.
        self.rebalances = 0
        # Stalls seen by the watchdog, in all and as of the last committed transaction.
        self._stalls = 0
        self._stalls_settled = 0

    def generation(self) -> int:
        """The consumer group's generation now (-1 while this member is not in the group)."""
        return self.group()[0]

    def settled(self) -> None:
        """The stalls seen so far are dealt with (the batches in flight were dropped)."""
        self._stalls_settled = self._stalls

    def check(self, polled_at: float, polled_generation: int) -> None:
        """Refuse to commit a batch, polled at ``polled_at`` (``time.perf_counter()``) in
        group generation ``polled_generation``, that this worker may no longer own.

        A restarted worker fences its predecessor through their shared transactional id.
        But a worker that stalls (a long GC pause, a stopped VM, SIGSTOP) past its session
        while another replica, with another transactional id, takes its partitions, is
        fenced by nothing: aiokafka commits offsets in a transaction without the group's
        generation (TxnOffsetCommit v0, no KIP-447), so the broker would accept the batch
        it had in flight, which the new owner re-does: published twice. Two fences stop
        that: the broker's, as :mod:`stream_app.kafka.fencing` sends the offsets with the
        group generation (a stale member's are refused: ``GroupFencedError``); and this
        one, which needs no round trip: heartbeats run on this event loop, so a stall of
        the loop is what can cost the membership: the watchdog counts stalls, and a batch
        is committed only if none happened since the last commit and the batch itself is
        younger than the session. And a batch is committed only in the group generation it
        was polled in: a member whose heartbeat found it expelled resets its generation to
        -1 while it rejoins, and the broker takes transactional offsets of generation -1
        from anyone (older clients send no generation).

        Raises:
            StaleBatch: the batch must be aborted and the partitions re-read.
        """
        age = time.perf_counter() - polled_at
        generation = self.generation()
        if generation < 0 or generation != polled_generation:
            # The membership was lost (the broker takes offsets with generation -1 from
            # anyone, for old clients) or a rebalance completed since the poll.
            raise StaleBatch(
                f"the group generation is {generation}, the batch was polled in "
                f"{polled_generation}: its partitions may belong to another member now"
            )
        if self._stalls != self._stalls_settled:
            raise StaleBatch(f"the worker stalled for over {self.stall_limit_s():.1f} s")
        if age > self.settings.consumer_session_timeout_s:
            raise StaleBatch(f"the batch took {age:.1f} s, longer than the consumer session")

    def stall_limit_s(self) -> float:
        """A gap between watchdog ticks past this is a stall that may cost the membership."""
        return self.settings.consumer_session_timeout_s / 2

    async def watch_stalls(self) -> None:
        """Count the times the event loop stalled long enough to lose the group membership."""
        limit = self.stall_limit_s()
        while True:
            before = time.monotonic()
            await asyncio.sleep(_WATCHDOG_TICK_S)
            gap = time.monotonic() - before
            if gap > limit:
                self._stalls += 1
                log.warning("the worker stalled for %.1f s (no heartbeats meanwhile)", gap)


_ASSIGNED: Final = "partitions assigned: "


def assigned_line(assigned: Iterable[TopicPartition]) -> str:
    """The log line of an assignment (what :func:`parse_assigned` reads back)."""
    return _ASSIGNED + ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


def parse_assigned(line: str) -> list[str] | None:
    """The partitions a worker's log line says it was assigned (``topic[partition]``), or
    None for another line: how the bench reads each worker's share of the partitions."""
    _, found, names = line.partition(_ASSIGNED)
    if not found:
        return None
    return names.strip().split(", ") if names.strip() else []


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """What the loop does when the group moves partitions.

    Revoked: not ready; finish and commit what is in flight (``finish_in_flight``), so the
    next owner starts where we stopped; drop what was buffered (``forget_buffered``):
    positions go back to the committed offsets on assignment, and it is read again, by us
    or by the next owner; drop the revoked partitions' lag gauges (``forget_lag``).
    Assigned: ready, and ``assigned`` notes it; waiting in the callback would hold up the
    group's join.
    """

    def __init__(
        self,
        membership: Membership,
        metrics: WorkerMetrics,
        *,
        finish_in_flight: Callable[[], Awaitable[None]],
        forget_buffered: Callable[[], None],
        forget_lag: Callable[[TopicPartition], None],
        assigned: Callable[[], None],
    ) -> None:
        self.membership = membership
        self.metrics = metrics
        self.finish_in_flight = finish_in_flight
        self.forget_buffered = forget_buffered
        self.forget_lag = forget_lag
        self.assigned = assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self.membership.rebalances += 1
        self.metrics.ready.set(0)
        await self.finish_in_flight()
        self.forget_buffered()
        for tp in revoked:
            self.forget_lag(tp)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("%s", assigned_line(assigned))
        self.membership.rebalances += 1
        self.assigned()
        self.metrics.ready.set(1)
