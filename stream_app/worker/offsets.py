"""Where the worker reads each partition from (:class:`Offsets`).

A partition without a committed offset starts at its beginning (a new group), or, for the
labels, where the former labels group committed; a partition whose position lies outside
its offsets (its topic deleted and re-created) goes through
``FRAUDSTREAM_OFFSET_RESET_POLICY``, logged and counted, never silently: the consumer runs
with ``auto_offset_reset="none"``. And :attr:`Offsets.processed` is the position up to
which every record has been processed and committed, per partition, which the lag gauges
and the labels backlog read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError, NoOffsetForPartitionError

from stream_app.config import Settings
from stream_app.errors import FraudStreamError
from stream_app.metrics import WorkerMetrics
from stream_app.scoring.pipeline import Inbound
from stream_app.worker.admin import SharedAdmin

if TYPE_CHECKING:
    from stream_app.worker.merge import EventTimeMerge, Polled

log = logging.getLogger(__name__)

# How long to wait for a position being resolved (a seek, a committed offset fetched): a few
# ms on a healthy cluster; a partition waiting for our own seek has none until it is done.
_POSITION_WAIT_S: Final = 1.0
# What each FRAUDSTREAM_OFFSET_RESET_POLICY does with a partition whose position is out of range.
_RESET_ACTIONS: Final = {
    "earliest": "reading it again from its first offset",
    "latest": "skipping to its end (what it holds now is not scored)",
    "fail": "stopping the worker",
}


async def position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position in ``tp``, or None when it has none right now.

    ``consumer.position`` waits for a position; with no automatic reset, a partition
    without a commit has none until :meth:`Offsets.start_uncommitted` seeks it, so waiting
    here would hold the loop that does the seeking.
    """
    try:
        position: int = await asyncio.wait_for(consumer.position(tp), _POSITION_WAIT_S)
    except (IllegalStateError, TimeoutError):  # revoked meanwhile, or no position yet
        return None
    return position


class Offsets:
    """The partitions' starting points and the positions processed so far.

    ``process`` scores, publishes and commits the records it is given and everything in
    flight (:meth:`~stream_app.worker.loop.ScoringLoop.process_now`): what was read of a
    partition before its position moves is committed first.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        settings: Settings,
        partitions: Mapping[str, int],
        metrics: WorkerMetrics,
        admin: SharedAdmin,
        merge: EventTimeMerge,
        process: Callable[[Sequence[Polled], Sequence[Inbound]], Awaitable[None]],
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.partitions = partitions
        self.metrics = metrics
        self.admin = admin
        self.merge = merge
        self.process = process
        # The next offset to process, per partition, as of the last commit.
        self.processed: dict[TopicPartition, int] = {}
        # Partitions whose committed position lies past their end (seen by the lag task):
        # the loop applies FRAUDSTREAM_OFFSET_RESET_POLICY to them (reset).
        self.out_of_range: dict[TopicPartition, int] = {}

    async def end_offsets(
        self, partitions: Sequence[TopicPartition], *, fetched: bool = True
    ) -> dict[TopicPartition, int]:
        """The end offset of each partition: ListOffsets, or (with ``fetched``) the last
        fetch's high watermark when that is further: the bundled broker answers ListOffsets
        with the start of the last record batch, a few records short."""
        ends: dict[TopicPartition, int] = await self.consumer.end_offsets(partitions)
        for tp in ends if fetched else ():
            highwater = self.consumer.highwater(tp) if tp in self.consumer.assignment() else None
            if highwater is not None and highwater > ends[tp]:
                ends[tp] = highwater
        return ends

    async def start_uncommitted(self, error: NoOffsetForPartitionError | None) -> None:
        """A partition without a committed offset starts at its beginning (a new group).

        Unless this worker committed there before: then the group's offsets were deleted
        with the topic (Apache Kafka drops them when a topic is deleted), and a re-created
        topic is what ``FRAUDSTREAM_OFFSET_RESET_POLICY`` is about (:meth:`reset`).
        A labels partition starts where the former labels group committed, if it did
        (:meth:`_former_labels_commits`).
        """
        tp = error.args[0] if error is not None and error.args else None
        partitions = [tp] if isinstance(tp, TopicPartition) else list(self.consumer.assignment())
        former: dict[TopicPartition, int] | None = None
        for partition in partitions:
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                if await self.consumer.committed(partition) is not None:
                    continue
                before = self.processed.get(partition, 0)
                if before > 0:
                    await self.reset({partition: before}, confirmed=True)
                    continue
                if partition.topic == self.settings.topic_labels:
                    if former is None:
                        former = await self._former_labels_commits()
                    if partition in former:
                        self.consumer.seek(partition, former[partition])
                        continue
                await self.consumer.seek_to_beginning(partition)

    async def _former_labels_commits(self) -> dict[TopicPartition, int]:
        """Where the labels consumer group of earlier versions (``FRAUDSTREAM_GROUP_ID``
        itself, read by a Faust agent) committed: a deployment upgraded to one group
        resumes its labels there rather than applying the whole topic again (harmless, a
        label applied twice counts once, but slow). Empty when it never did, or when the
        brokers cannot tell (then the labels are read from their start)."""
        topic = self.settings.topic_labels
        partitions = [TopicPartition(topic, p) for p in range(self.partitions[topic])]
        try:
            admin = await self.admin.client()
            committed = await admin.list_consumer_group_offsets(
                self.settings.group_id, partitions=partitions
            )
        except KafkaError as exc:
            self.metrics.kafka_errors.labels("admin").inc()
            log.warning("cannot read the former labels group's commits (%s)", exc)
            return {}
        found = {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
        if found:
            log.info(
                "labels resume where the former labels group %s committed: %s",
                self.settings.group_id,
                ", ".join(f"{tp.topic}[{tp.partition}] at {o}" for tp, o in sorted(found.items())),
            )
        return found

    async def reset(self, found: Mapping[TopicPartition, int], *, confirmed: bool) -> None:
        """Apply ``FRAUDSTREAM_OFFSET_RESET_POLICY`` to partitions whose position is outside
        their offsets: their topic was deleted and re-created (or truncated), and what the
        group committed means nothing there any more.

        Never silent: logged at ERROR with the topic, partition, position and the offsets
        the partition now holds, and counted (``fraudstream_offset_resets_total``).
        ``confirmed`` is False for what the lag task saw: checked again here first.

        Raises:
            FraudStreamError: the policy is ``fail``.
        """
        for tp in found:
            self.out_of_range.pop(tp, None)
        owned = [tp for tp in found if tp in self.consumer.assignment()]
        if not owned:
            return
        # What was read before is scored and committed first (the old topic's records:
        # they cannot be read again), so the next commits start from the new position.
        await self.process(*self.merge.take(owned))
        starts: dict[TopicPartition, int] = await self.consumer.beginning_offsets(owned)
        # A fetch that failed out of range saw the new topic: the old high watermark is moot.
        ends = await self.end_offsets(owned, fetched=not confirmed)
        policy = self.settings.offset_reset_policy
        for tp in owned:
            position = found[tp]
            if not confirmed:
                position = self.processed.get(tp, position)
                if starts[tp] <= position <= ends[tp]:
                    continue
            self.metrics.offset_resets.labels(tp.topic, policy).inc()
            log.error(
                "offset %d of %s[%d] is out of range: the partition now holds offsets %d to "
                "%d (its topic was deleted and re-created, or truncated); "
                "FRAUDSTREAM_OFFSET_RESET_POLICY=%s: %s",
                position,
                tp.topic,
                tp.partition,
                starts[tp],
                ends[tp],
                policy,
                _RESET_ACTIONS[policy],
            )
            if policy == "fail":
                raise FraudStreamError(
                    f"offset {position} of {tp.topic}[{tp.partition}] is out of range "
                    f"({starts[tp]} to {ends[tp]}): stopping, as FRAUDSTREAM_OFFSET_RESET_POLICY"
                    "=fail says; set it to earliest or latest to go on"
                )
            self.merge.forget_clock(tp)
            if policy == "earliest":
                await self.consumer.seek_to_beginning(tp)
                self.processed[tp] = starts[tp]
            else:
                await self.consumer.seek_to_end(tp)
                self.processed[tp] = ends[tp]

    async def catch_up(self) -> None:
        """Count as processed what the fetch skipped (called idle, with nothing in flight).

        Under exactly-once every transaction ends with a commit marker, an offset that holds
        no record: the last committed offset stays one short of the high watermark, and the
        lag gauge would read 1 for ever. With nothing buffered, pending or unsettled, every
        record before the consumer's position has been processed, so the position is too.
        """
        for tp in list(self.consumer.assignment()):
            if self.merge.holds(tp) or tp not in self.processed:
                continue
            position = await position_now(self.consumer, tp)
            if position is None:
                continue
            if position > self.processed.get(tp, position):
                self.processed[tp] = position
