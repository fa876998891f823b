"""The worker's one Kafka path: transactions and labels, in micro-batches, applied in Redis,
scored, published, committed (see :class:`ScoringLoop`).

One consumer group (``FRAUDSTREAM_GROUP_ID`` + ``.scoring``) reads the transactions, the
repartition and the labels topics; one producer publishes every output (scores, alerts,
shadow scores, both dead-letter topics, re-keyed forwards); one commit path commits a
message's offset only once its effect is in Redis and its outputs are acknowledged (under
``exactly_once``, in the same Kafka transaction as the outputs); one lag gauge covers every
partition the group reads.

A batch holds the transactions taken by the event-time merge (:meth:`ScoringLoop._poll`)
and the labels fetched meanwhile. Its state call applies the labels first
(:func:`~stream_app.scoring.pipeline.apply_labels`: a label applied twice counts once), then the
transactions; invalid or mismatched labels go to the labels dead-letter topic with the
batch's other outputs. A Redis outage therefore holds labels exactly as it holds
transactions: retried, never committed unapplied.

**Labels before a backlog.** A transaction's terminal windows count the frauds labelled up
to days of event time before it. Live, a label is applied within a batch of its arrival,
long before a transaction reads it; but after a restart the loop would score days of
backlog in seconds, before that backlog's labels are applied, and features would depend on
timing. So after every assignment (:meth:`ScoringLoop._labels_caught_up`), the loop reads
only labels until the group has applied every label published before the assignment, on
every labels partition: those it owns it applies and commits itself; those another member
owns, that member applies meanwhile (every member goes through the same phase after the
rebalance that assigned them), and its progress is read from the group's committed
offsets, which only ever name applied labels. Then it scores the transactions. The wait
is bounded (``_LABELS_WAIT_S``): a member that never catches up delays scoring that long,
with a warning, once per assignment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    ProducerFenced,
    UnknownTopicOrPartitionError,
)
from redis.exceptions import (
    RedisError,
)

from stream_app.backoff import BACKOFF_START_S, Backoff, describe_error, fatal_kafka_error
from stream_app.errors import FraudStreamError, RejectedEvent, RejectReason
from stream_app.kafka import config as kafka_config
from stream_app.kafka import preflight as kafka_preflight
from stream_app.kafka.fencing import GroupFencedError, fence_by_generation, group_metadata
from stream_app.kafka.publisher import Output, Publisher, key_partition
from stream_app.metrics import observe_many
from stream_app.records import TransactionEvent, dead_letter_headers
from stream_app.scoring.controls import ControlsFeed
from stream_app.scoring.pipeline import (
    Accepted,
    Inbound,
    LabelBatch,
    Rejected,
    ScoredBatch,
    ScoringPipeline,
    apply_labels,
    validate_transaction,
)
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import BatchState
from stream_app.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

# The lag gauges are refreshed this often from the brokers' end offsets, by a task of their
# own (see ScoringLoop._report_lag_forever): one ListOffsets and, before the first commit,
# one OffsetFetch request a second.
_LAG_REFRESH_S: Final = 1.0
_NOTHING_SCORED: Final = ScoredBatch.empty()
# Batches scored and sent but not yet acknowledged and committed. Enough to keep the
# producer busy while the next batches are scored; bounded so an outage stops polling.
_MAX_UNSETTLED: Final = 4
# Buffered records older than this mean a backlog: then partitions are kept abreast in
# event time, a batch ends where a partition runs dry, and the next one waits up to
# _CATCH_UP_WAIT_MS for that partition's fetch (a few ms unless the machine is starved).
_CATCH_UP_AGE_MS: Final = 1000
_CATCH_UP_WAIT_MS: Final = 500
_ALIGN_STEP_S: Final = 0.002
# After an assignment, scoring waits at most this long for the group to apply the labels
# already published (see ScoringLoop._labels_caught_up), reading its commits this often.
_LABELS_WAIT_S: Final = 30.0
_LABELS_POLL_S: Final = 0.2
# The stall watchdog's tick; a gap between ticks longer than half the consumer session
# means heartbeats stopped long enough for the group to evict this member.
_WATCHDOG_TICK_S: Final = 0.1
_METADATA_MAX_AGE_MS: Final = 5_000
# How long to wait for a position being resolved (a seek, a committed offset fetched): a few
# ms on a healthy cluster; a partition waiting for our own seek has none until it is done.
_POSITION_WAIT_S: Final = 1.0
# What each FRAUDSTREAM_OFFSET_RESET_POLICY does with a partition whose position is out of range.
_RESET_ACTIONS: Final = {
    "earliest": "reading it again from its first offset",
    "latest": "skipping to its end (what it holds now is not scored)",
    "fail": "stopping the worker",
}


class _StaleBatch(Exception):
    """A batch that must not be committed: this worker stalled (or the batch took longer
    than the consumer session), so the group may have given its partitions to another
    member, which re-does the batch from the last commit."""


@dataclass(frozen=True, slots=True)
class _Polled:
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


@dataclass
class _Batch:
    """One polled micro-batch on its way through the loop."""

    offsets: dict[TopicPartition, int]  # next offset to consume, per partition
    messages: int
    local: list[Accepted]
    forwards: list[Output]
    dead_letters: list[Output]
    rejected: list[Rejected]
    polled_at: float
    labels: list[Inbound] = field(default_factory=list)  # applied before the transactions
    generation: int = -1  # the consumer group's generation when the batch was polled
    applied: LabelBatch | None = None  # the labels' outcome, once applied in Redis
    state: asyncio.Task[BatchState | None] | None = None
    unscorable: list[Rejected] = field(default_factory=list)  # dead-lettered after scoring
    outputs: list[Output] = field(default_factory=list)
    acks: list[asyncio.Future[Any]] = field(default_factory=list)
    # ScoringLoop._losses when the outputs were sent (_SENT_WHILE_MISSING: an output topic
    # was known to be missing): a loss seen since means they must be sent again.
    sent_after_loss: int = 0


# A batch sent while an output topic was known to be missing.
_SENT_WHILE_MISSING: Final = -1


@dataclass
class _LabelsBacklog:
    """The labels published before an assignment, to be applied before scoring."""

    ends: dict[TopicPartition, int]  # end offset of every labels partition, then
    started: float  # time.monotonic() at the assignment
    checked_at: float = -math.inf  # last read of the group's commits


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, scoring: ScoringLoop) -> None:
        self.scoring = scoring

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # Finish and commit what we hold, so the next owner starts where we stopped.
        self.scoring.rebalances += 1
        self.scoring.metrics.ready.set(0)
        await self.scoring.finish_in_flight()
        # Positions go back to the committed offsets on assignment: what we buffered is
        # read again, by us or by the next owner.
        self.scoring.forget_buffered()
        for tp in revoked:
            with contextlib.suppress(KeyError):
                self.scoring.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        names = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
        log.info("partitions assigned: %s", ", ".join(names))
        # Not here: waiting in the callback would hold up the group's join.
        self.scoring.rebalances += 1
        self.scoring.labels_pending = True
        self.scoring.metrics.ready.set(1)


class ScoringLoop:
    """Transactions and labels, as three overlapping stages, each in batch order:

    1. **state**: a batch's Redis calls (its labels, then its transactions) are sent as
       soon as the previous batch's reply is back, so Redis works on batch k+1 while Python
       scores batch k; state calls never overlap, which keeps every customer's history in
       arrival order;
    2. **score and send**: features, model calls and records; outputs are queued to the
       producer without waiting for acknowledgements;
    3. **settle** (a task of its own): waits for each batch's acknowledgements in order,
       re-sends a batch whose outputs failed, and only then commits its offsets.

    At most ``_MAX_UNSETTLED`` batches wait in stage 3; past that, polling waits. Under
    ``exactly_once`` stages 2 and 3 are one Kafka transaction per batch instead.
    """

    def __init__(self, runtime: WorkerRuntime, store: RedisStateStore) -> None:
        self.runtime = runtime
        self.store = store
        s = runtime.settings
        self.settings = s
        self.metrics = runtime.metrics
        # Operators' lists and threshold overrides, followed by a consumer of no group.
        self.controls = ControlsFeed(s, runtime.metrics)
        self.pipeline = ScoringPipeline(
            store,
            runtime.models,
            runtime.metrics,
            max_reasons=s.max_reasons,
            psi_window=s.psi_window,
            controls=lambda: self.controls.current,
        )
        self.backoff = Backoff(runtime.metrics, s.retry_backoff_max_s)
        self.source_partitions = runtime.partitions[s.topic_transactions]
        self._lock = asyncio.Lock()
        self._buffered: dict[TopicPartition, deque[_Polled]] = {}  # transactions
        self._labels_buffered: dict[TopicPartition, deque[Inbound]] = {}
        self._clocks: dict[TopicPartition, float] = {}  # merge key of the last record taken
        self._drained_at: dict[TopicPartition, float] = {}  # epoch ms, by partition
        self._pending: _Batch | None = None
        self._unsettled: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=_MAX_UNSETTLED)
        self._settler: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._processed: dict[TopicPartition, int] = {}
        # Partitions whose committed position lies past their end (seen by the lag task):
        # the loop applies FRAUDSTREAM_OFFSET_RESET_POLICY to them (_reset_offsets).
        self._out_of_range: dict[TopicPartition, int] = {}
        self._lag_task: asyncio.Task[None] | None = None
        self._lag_failing = False
        self.labels_pending = False  # set on assignment: see _labels_caught_up
        self._labels_backlog: _LabelsBacklog | None = None
        # Rebalance callbacks run so far: a batch polled before one must not be processed.
        self.rebalances = 0
        self._admin: AIOKafkaAdminClient | None = None  # see _admin_client
        self._admin_lock = asyncio.Lock()
        # Output topics found missing (see _check_outputs_exist): how many times, and now.
        self._losses = 0
        self._outputs_missing = False
        # Stalls seen by the watchdog, in all and as of the last committed transaction.
        self._stalls = 0
        self._stalls_settled = 0
        self._watchdog: asyncio.Task[None] | None = None
        self.consumer = AIOKafkaConsumer(
            **{
                **kafka_config.consumer_kwargs(s, s.scoring_group_id),
                # Never reset a position silently: a partition without a commit starts at
                # its beginning, and one whose position is out of range (its topic deleted
                # and re-created) goes through _reset_offsets, logged and counted.
                "auto_offset_reset": "none",
                # A topic deleted and re-created is seen (and re-assigned) within seconds,
                # not at aiokafka's default five-minute metadata refresh.
                "metadata_max_age_ms": _METADATA_MAX_AGE_MS,
            },
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        # The group generation and member id, read when needed (see _check_still_member).
        self._group = group_metadata(self.consumer)
        transactional_id = kafka_config.scoring_transactional_id(s) if s.exactly_once else None
        self.producer = AIOKafkaProducer(
            **kafka_config.producer_kwargs(s, transactional_id=transactional_id)
        )
        self.publisher = Publisher(self.producer)
        # Scoring runs here, off the event loop, so that while a batch is scored the loop
        # keeps sending the next batch's state call (large writes need several turns of
        # the loop), reading fetch responses and acknowledgements. One thread: batches are
        # still scored one at a time, in order.
        self._scoring_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="score"
        )

    async def start(self) -> None:
        """Connect to Kafka (retrying until it answers) and subscribe."""
        await self.backoff.run(
            self.producer.start,
            "starting the Kafka producer",
            (KafkaError,),
            self._kafka_error("produce"),
        )
        await self.backoff.run(
            self.consumer.start,
            "starting the Kafka consumer",
            (KafkaError,),
            self._kafka_error("consume"),
        )
        # Before any scoring: a restarted worker must not approve a blocked card.
        await self.backoff.run(
            self.controls.start,
            "reading the controls topic",
            (KafkaError,),
            self._kafka_error("consume"),
        )
        self.consumer.subscribe(
            [
                self.settings.topic_transactions,
                self.settings.topic_repartition,
                self.settings.topic_labels,
            ],
            listener=_Rebalance(self),
        )
        if self.settings.exactly_once:
            # Offsets go with the group generation: a stale member's batch cannot commit.
            fence_by_generation(self.producer, self._group)

    def _kafka_error(self, operation: str) -> Callable[[BaseException], None]:
        counter = self.metrics.kafka_errors.labels(operation)
        return lambda _exc: counter.inc()

    def _redis_error(self, _exc: BaseException) -> None:
        self.metrics.redis_errors.inc()

    async def run(self) -> None:
        """Consume until :meth:`stop` is called, then finish everything in flight."""
        self._settler = asyncio.create_task(self._settle_forever(), name="settle")
        self._lag_task = asyncio.create_task(self._report_lag_forever(), name="consumer-lag")
        controls = asyncio.create_task(self.controls.run(), name="controls")
        if self.settings.exactly_once:
            self._watchdog = asyncio.create_task(self._watch_stalls(), name="stall-watchdog")
        wait_ms = max(1, int(self.settings.batch_max_wait_s * 1000))
        poll_pause = BACKOFF_START_S
        try:
            while not self._stopping.is_set():
                if self._settler.done():  # it only ends by failing: surface its error
                    self._settler.result()
                if self.labels_pending:
                    self.labels_pending = False
                    # Every partition without a commit starts now, all together: waiting
                    # for each one's NoOffsetForPartitionError would start them one by
                    # one, and the event-time merge would run ahead on the first ones.
                    await self._start_uncommitted(None)
                    self._labels_backlog = await self._labels_published()
                if self._out_of_range:
                    await self._reset_offsets(dict(self._out_of_range), confirmed=False)
                labels_only = self._labels_backlog is not None and not (
                    await self._labels_caught_up(self._labels_backlog)
                )
                # With a batch in flight, take only what is already fetched: never wait.
                # Waiting for the labels backlog, wait as long as between two checks.
                idle_ms = int(_LABELS_POLL_S * 1000) if labels_only else wait_ms
                timeout = 0 if self._pending is not None else idle_ms
                rebalances = self.rebalances
                try:
                    polled, labels = await self._poll(timeout, labels_only=labels_only)
                except NoOffsetForPartitionError as exc:
                    # A partition this group never committed: read it from the start.
                    await self._start_uncommitted(exc)
                    continue
                except OffsetOutOfRangeError as exc:
                    await self._reset_offsets(dict(exc.args[0]), confirmed=True)
                    continue
                except KafkaError as exc:
                    self.metrics.kafka_errors.labels("consume").inc()
                    fatal = fatal_kafka_error("polling transactions", exc)
                    if fatal is not None:
                        raise fatal from exc
                    # Not ready while polls fail; the pause grows like every retry's.
                    self.metrics.ready.hold("polling")
                    log.warning(
                        "polling transactions failed (%s); retrying in %.1f s",
                        describe_error(exc),
                        poll_pause,
                    )
                    await asyncio.sleep(poll_pause)
                    poll_pause = min(poll_pause * 2, self.settings.retry_backoff_max_s)
                    continue
                if poll_pause != BACKOFF_START_S:
                    poll_pause = BACKOFF_START_S
                    self.metrics.ready.release("polling")
                async with self._lock:
                    if rebalances != self.rebalances and (polled or labels):
                        # A rebalance ran while we polled: these records may come from
                        # partitions revoked meanwhile (perhaps handed back to us, from the
                        # committed offsets). Processed now they could be published twice:
                        # read everything again from the committed offsets instead.
                        polled, labels = [], []
                        log.info("a rebalance ran during a poll: re-reading from the commits")
                        await self._reread_from_committed()
                    batch = self._prepare(polled, labels) if polled or labels else None
                    await self._advance(batch)
                if batch is None:
                    if labels_only:
                        # Settle what was applied, so that the group's commits show it.
                        await self.finish_in_flight()
                    await self._catch_up_positions()
            await self.finish_in_flight()
        finally:
            self.controls.stop()
            for task in (self._settler, self._watchdog, self._lag_task, controls):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _labels_published(self) -> _LabelsBacklog | None:
        """The end offsets of every labels partition: what must be applied before scoring
        (see the module's docstring). None when the brokers cannot tell (then scoring
        goes on without waiting, with a warning)."""
        topic = self.settings.topic_labels
        partitions = [TopicPartition(topic, p) for p in range(self.runtime.partitions[topic])]
        try:
            ends = await self._end_offsets(partitions, fetched=False)
        except KafkaError as exc:
            self.metrics.kafka_errors.labels("admin").inc()
            log.warning("cannot tell which labels were published (%s); scoring anyway", exc)
            return None
        return _LabelsBacklog(ends, time.monotonic())

    async def _labels_caught_up(self, backlog: _LabelsBacklog) -> bool:
        """Whether the group has applied every label of ``backlog`` (then it is dropped).

        A transaction's terminal windows count the frauds labelled up to eight days of
        event time before it. After a restart both streams start from a backlog; scored at
        once, days of transactions would be scored before their labels are applied, and the
        features (and the histories they are stored in) would depend on timing. So after an
        assignment the loop reads only labels until the group's committed offsets (which
        name applied labels only: this loop commits a label once it is in Redis) reach the
        end offsets of every labels partition as of the assignment, its own partitions and
        the other members'. Its own it applies meanwhile (``labels_only`` in :meth:`run`);
        the other members, assigned by the same rebalance, apply theirs. At most
        ``_LABELS_WAIT_S``: a labels path that does not catch up delays scoring that long,
        once per assignment, with a warning, and does not stop it.
        """
        now = time.monotonic()
        if now - backlog.checked_at < _LABELS_POLL_S:
            return False
        backlog.checked_at = now
        try:
            admin = await self._admin_client()
            committed = await admin.list_consumer_group_offsets(
                self.settings.scoring_group_id, partitions=list(backlog.ends)
            )
        except KafkaError as exc:
            self.metrics.kafka_errors.labels("admin").inc()
            log.warning("cannot tell how far the labels are applied (%s); scoring anyway", exc)
            self._labels_backlog = None
            return True
        behind = 0
        for tp, end in backlog.ends.items():
            done = committed[tp].offset if tp in committed else -1
            # Our own partitions: also what _catch_up_positions counted (commit markers).
            behind += max(end - max(done, self._processed.get(tp, -1), 0), 0)
        waited = now - backlog.started
        if behind and waited <= _LABELS_WAIT_S:
            return False
        self._labels_backlog = None
        if behind:
            log.warning(
                "the group %s is still %d labels behind after %.0f s; scoring without them "
                "(terminal risk may miss recent frauds)",
                self.settings.scoring_group_id,
                behind,
                _LABELS_WAIT_S,
            )
        elif waited > 1.0:
            log.info("applied the labels backlog in %.1f s before scoring", waited)
        return True

    async def _admin_client(self) -> AIOKafkaAdminClient:
        """The admin client the loop's tasks share, started on first use."""
        async with self._admin_lock:
            if self._admin is None:
                admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(self.settings))
                await admin.start()
                self._admin = admin
            return self._admin

    async def _poll(
        self, timeout_ms: int, *, labels_only: bool = False
    ) -> tuple[list[_Polled], list[Inbound]]:
        """Up to a batch of validated transactions, the earliest events first across
        partitions, and the labels fetched meanwhile (up to a batch per partition); with
        ``labels_only``, labels alone (see :meth:`_labels_caught_up`).

        aiokafka's ``getmany`` drains one partition's whole fetch (up to a megabyte)
        before the next. Catching up on a backlog, one partition would then run ahead of
        the others in event time, and terminal windows, which count the transactions of
        every partition, would miss some. So each partition's messages are validated and
        buffered (up to a batch each), and a batch takes the earliest by event time: a
        k-way merge in which each partition contributes a prefix, so committed offsets stay
        contiguous. A partition's place in the merge is its head's :func:`merge_key`, which
        one event far ahead of (or behind) its neighbours cannot move. While catching up,
        a batch also ends where a partition runs dry, and the next one first waits for that
        partition's fetch (:meth:`_align`). Live, partitions are caught up, nothing waits,
        and this is simply arrival order.

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
        taken: list[_Polled] = []
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

    def _head_key(self, tp: TopicPartition, buffer: deque[_Polled]) -> float:
        """The merge key of a partition's head record (see :func:`merge_key`)."""
        after = buffer[1].event_time if len(buffer) > 1 else None
        return merge_key(self._clocks.get(tp), buffer[0].event_time, after)

    def _buffer(self, fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Buffer fetched records: labels as they came (validated when applied),
        transactions validated, with their event times for the merge."""
        limits = self.runtime.limits
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
                buffer.append(_Polled(tp, outcome, event_time))

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
        position = await self._position_now(tp)
        return position is not None and position < highwater

    async def _position_now(self, tp: TopicPartition) -> int | None:
        """The consumer's position in ``tp``, or None when it has none right now.

        ``consumer.position`` waits for a position; with no automatic reset, a partition
        without a commit has none until :meth:`_start_uncommitted` seeks it, so waiting
        here would hold the loop that does the seeking.
        """
        try:
            position: int = await asyncio.wait_for(self.consumer.position(tp), _POSITION_WAIT_S)
        except (IllegalStateError, TimeoutError):  # revoked meanwhile, or no position yet
            return None
        return position

    def forget_buffered(self) -> None:
        """Drop records polled but not yet taken (on a rebalance: they will be re-read)."""
        self._buffered.clear()
        self._labels_buffered.clear()
        self._clocks.clear()
        self._drained_at.clear()

    async def publish_label_dead_letters(self, rejected: Sequence[Rejected]) -> None:
        """Publish labels' dead letters outside a batch (the expired labels' sweep), with
        the loop's producer: between two batches, and under ``exactly_once`` in a Kafka
        transaction of their own (the producer is transactional).

        Raises:
            KafkaError: some dead letter was not acknowledged (the caller retries later).
        """
        topic = self.settings.topic_label_dead_letters
        outputs = [self._dead_letter(r, topic) for r in rejected]
        async with self._lock:
            if self.settings.exactly_once:
                async with self.producer.transaction():
                    await self.publisher.publish(outputs)
            else:
                await self.publisher.publish(outputs)

    async def stop(self) -> None:
        """Stop polling; :meth:`run` then finishes what is in flight and returns."""
        self._stopping.set()

    async def close(self) -> None:
        """Leave the consumer group and flush the producer."""
        with contextlib.suppress(KafkaError):
            await self.consumer.stop()
        with contextlib.suppress(KafkaError):
            await self.controls.close()
        with contextlib.suppress(KafkaError):
            await self.producer.stop()
        if self._admin is not None:
            with contextlib.suppress(KafkaError):
                await self._admin.close()
        self._scoring_thread.shutdown(wait=True)

    async def finish_in_flight(self) -> None:
        """Score, publish and commit everything polled (before a rebalance or a stop)."""
        async with self._lock:
            await self._advance(None)
        if self._settler is not None and not self._settler.done():
            await self._unsettled.join()

    async def _advance(self, batch: _Batch | None) -> None:
        """Start ``batch``'s state call and finish the one before it (holding the lock)."""
        previous, self._pending = self._pending, None
        state = await self._state_of(previous) if previous is not None else None
        if batch is not None and (batch.local or batch.labels):
            batch.state = asyncio.create_task(self._update_state(batch))
            await asyncio.sleep(0)  # let the call go out before the CPU-bound work below
        if previous is not None:
            try:
                await self._score_and_send(previous, state)
            except _StaleBatch as exc:
                await self._rewind(batch, exc)
                return
        self._pending = batch

    async def _update_state(self, batch: _Batch) -> BatchState | None:
        """A batch's state calls: its labels (once applied, not again), then its
        transactions (None without any)."""
        if batch.labels and batch.applied is None:
            batch.applied = await apply_labels(
                batch.labels, self.store, self.runtime.limits, self.metrics
            )
        if not batch.local:
            return None
        return await self.pipeline.update_state([a.event for a in batch.local])

    async def _state_of(self, batch: _Batch) -> BatchState | None:
        if batch.state is None:
            return None
        try:
            return await batch.state
        except RedisError as exc:
            self._redis_error(exc)
            log.warning("updating state failed (%s); retrying", exc)
        return await self.backoff.run(
            lambda: self._update_state(batch),
            "updating state in Redis",
            (RedisError,),
            self._redis_error,
        )

    def _prepare(self, polled: Sequence[_Polled], labels: Sequence[Inbound] = ()) -> _Batch:
        """Route a polled batch and build its dead letters: no I/O."""
        s = self.settings
        offsets: dict[TopicPartition, int] = {}
        for label in labels:
            tp = TopicPartition(label.topic, label.partition)
            offsets[tp] = max(offsets.get(tp, 0), label.offset + 1)
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        for item in polled:
            offsets[item.tp] = max(offsets.get(item.tp, 0), item.outcome.message.offset + 1)
            if isinstance(item.outcome, Accepted):
                accepted.append(item.outcome)
            else:
                rejected.append(item.outcome)
        local: list[Accepted] = []
        forwards: list[Output] = []
        for valid in accepted:
            message = valid.message
            key = valid.event.customer_id.encode()
            home = key_partition(key, self.source_partitions)
            # Events read from the repartition topic are processed wherever they are, so a
            # partition-count change can never bounce an event between the two topics.
            if message.topic == s.topic_repartition or message.partition == home:
                local.append(valid)
            else:
                forwards.append(
                    Output(
                        s.topic_repartition,
                        home,
                        key,
                        message.value or b"",
                        timestamp_ms=message.timestamp_ms,
                    )
                )
        dead_letters = [self._dead_letter(r) for r in rejected]
        return _Batch(
            offsets,
            len(polled) + len(labels),
            local,
            forwards,
            dead_letters,
            rejected,
            time.perf_counter(),
            list(labels),
            self._group()[0],
        )

    def _dead_letter(self, rejected: Rejected, topic: str | None = None) -> Output:
        """The dead letter of a message: its original bytes, and why, in headers; on the
        transactions' dead-letter topic unless ``topic`` says another."""
        m = rejected.message
        topic = topic or self.settings.topic_dead_letters
        return Output(
            topic,
            # Source order kept per partition.
            m.partition % self.runtime.partitions[topic],
            m.key,
            m.value or b"",
            dead_letter_headers(rejected.error, m.topic, m.partition, m.offset),
        )

    def _refuse_scored(self, batch: _Batch, scored: ScoredBatch) -> None:
        """Dead-letter the events the batch could not score: those the champion gave no
        probability for, and conflicting duplicates (see ``ScoredBatch``)."""
        version = self.runtime.models.champion.version
        refusals = [
            (
                i,
                RejectReason.UNSCORABLE,
                f"model {version} gave no probability for this transaction",
            )
            for i in scored.unscorable
        ] + [
            (
                i,
                RejectReason.CONFLICTING_DUPLICATE,
                f"transaction id {batch.local[i].event.transaction_id!r} was already used "
                "for another transaction (amount, time, terminal or customer differ)",
            )
            for i in scored.conflicting
        ]
        for i, reason, detail in refusals:
            rejected = Rejected(batch.local[i].message, RejectedEvent(reason, detail))
            batch.unscorable.append(rejected)
            batch.dead_letters.append(self._dead_letter(rejected))
            log.warning(
                "transaction at %s[%d] offset %d refused (%s): dead-lettered",
                rejected.message.topic,
                rejected.message.partition,
                rejected.message.offset,
                reason,
            )

    def _outputs(self, scored: ScoredBatch) -> list[Output]:
        s = self.settings
        scores_n = self.runtime.partitions[s.topic_scores]
        alerts_n = self.runtime.partitions[s.topic_alerts]
        shadow_n = self.runtime.partitions[s.topic_shadow_scores]
        keys = scored.keys
        outputs = [
            Output(s.topic_scores, key_partition(key, scores_n), key, payload)
            for key, payload in zip(keys, scored.payloads, strict=True)
        ]
        for i in scored.alerts:
            key = keys[i]
            outputs.append(
                Output(s.topic_alerts, key_partition(key, alerts_n), key, scored.payloads[i])
            )
        for key, payload in zip(scored.shadow_keys, scored.shadow_payloads, strict=True):
            shadow = key_partition(key, shadow_n)
            outputs.append(Output(s.topic_shadow_scores, shadow, key, payload))
        return outputs

    def _score(
        self, events: list[TransactionEvent], state: BatchState | None
    ) -> tuple[list[Output], ScoredBatch]:
        """Features, model calls and records of a batch (in the scoring thread)."""
        scored = self.pipeline.score(events, state) if state is not None else _NOTHING_SCORED
        return self._outputs(scored), scored

    async def _score_and_send(self, batch: _Batch, state: BatchState | None) -> None:
        """Score a batch and queue its outputs; stage 3 commits it once acknowledged."""
        for swap in self.runtime.models.activate_pending():
            log.info("model swap between batches: %s", swap)
        events = [a.event for a in batch.local]
        outputs, scored = await asyncio.get_running_loop().run_in_executor(
            self._scoring_thread, self._score, events, state
        )
        if scored.unscorable or scored.conflicting:
            self._refuse_scored(batch, scored)
        if batch.applied is not None:
            label_dlq = self.settings.topic_label_dead_letters
            batch.dead_letters += [self._dead_letter(r, label_dlq) for r in batch.applied.rejected]
        batch.outputs = [*batch.dead_letters, *batch.forwards, *outputs]
        if self.settings.exactly_once:
            await self.backoff.run(
                lambda: self._transaction(batch),
                "publishing a transaction",
                (KafkaError,),
                self._kafka_error("produce"),
            )
            self._settled(batch)
            self.metrics.last_commit_timestamp.set(time.time())
            self.metrics.offsets_committed.inc(batch.messages)
            self._processed.update(batch.offsets)
            return
        batch.acks = await self.backoff.run(
            lambda: self.publisher.send(batch.outputs),
            "queueing outputs",
            (KafkaError,),
            self._kafka_error("produce"),
        )
        batch.sent_after_loss = self._sent_mark()
        await self._unsettled.put(batch)

    async def _transaction(self, batch: _Batch) -> None:
        try:
            async with self.producer.transaction():
                # No transaction while an output topic is known to be missing: Apache
                # Kafka refuses its records only after the producer's request timeout,
                # and what a re-created topic takes meanwhile must not outlive an abort
                # (Publisher.publish lets no send retry past it).
                self._refuse_while_outputs_missing(batch)
                await self.publisher.publish(batch.outputs)
                await self.producer.send_offsets_to_transaction(
                    dict(batch.offsets), self.settings.scoring_group_id
                )
                self._check_still_member(batch)  # raising here aborts the transaction
        except GroupFencedError as exc:
            # The group coordinator refused the offsets (a stale generation): aborted.
            raise _StaleBatch(str(exc)) from exc
        except ProducerFenced as exc:
            # Another instance with our transactional id took over: we must not go on.
            raise FraudStreamError(
                f"this worker's producer was fenced ({exc}): is FRAUDSTREAM_INSTANCE_ID "
                "shared by two running workers?"
            ) from exc

    def _check_still_member(self, batch: _Batch) -> None:
        """Refuse to commit a batch this worker may no longer own.

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
            _StaleBatch: the batch must be aborted and the partitions re-read.
        """
        age = time.perf_counter() - batch.polled_at
        generation, _ = self._group()
        if generation < 0 or generation != batch.generation:
            # The membership was lost (the broker takes offsets with generation -1 from
            # anyone, for old clients) or a rebalance completed since the poll.
            raise _StaleBatch(
                f"the group generation is {generation}, the batch was polled in "
                f"{batch.generation}: its partitions may belong to another member now"
            )
        if self._stalls != self._stalls_settled:
            raise _StaleBatch(f"the worker stalled for over {self._stall_limit_s():.1f} s")
        if age > self.settings.consumer_session_timeout_s:
            raise _StaleBatch(f"the batch took {age:.1f} s, longer than the consumer session")

    def _stall_limit_s(self) -> float:
        return self.settings.consumer_session_timeout_s / 2

    async def _watch_stalls(self) -> None:
        """Count the times the event loop stalled long enough to lose the group membership."""
        limit = self._stall_limit_s()
        while True:
            before = time.monotonic()
            await asyncio.sleep(_WATCHDOG_TICK_S)
            gap = time.monotonic() - before
            if gap > limit:
                self._stalls += 1
                log.warning("the worker stalled for %.1f s (no heartbeats meanwhile)", gap)

    async def _rewind(self, batch: _Batch | None, reason: _StaleBatch) -> None:
        """After an aborted batch, drop what is in flight and re-read from the last commit.

        The state calls already made are redone (the state recognises them), and if the
        partitions did move, the rebalance now under way hands them to their new owner.
        """
        log.warning(
            "batch aborted, not committed (%s): re-reading from the last committed offsets",
            reason,
        )
        self.metrics.kafka_errors.labels("commit").inc()
        if batch is not None and batch.state is not None:
            with contextlib.suppress(RedisError):
                await batch.state
        await self._reread_from_committed()
        self._stalls_settled = self._stalls

    async def _reread_from_committed(self) -> None:
        """Drop what is buffered and move every assigned partition back to its committed
        offset (the beginning when nothing is committed: ``auto_offset_reset`` earliest)."""
        self.forget_buffered()

        async def seek() -> None:
            for tp in list(self.consumer.assignment()):
                with contextlib.suppress(IllegalStateError):  # revoked meanwhile: reset anyway
                    committed = await self.consumer.committed(tp)
                    if committed is None or committed <= 0:
                        await self.consumer.seek_to_beginning(tp)
                    else:
                        self.consumer.seek(tp, committed)

        await self.backoff.run(
            seek,
            "re-reading from the committed offsets",
            (KafkaError,),
            self._kafka_error("consume"),
        )

    async def _settle_forever(self) -> None:
        """Stage 3: acknowledgements then commits, batch after batch, in order."""
        while True:
            batch = await self._unsettled.get()
            ready = [batch]
            # Batches already queued behind this one share its commit request.
            while not self._unsettled.empty() and len(ready) < _MAX_UNSETTLED:
                ready.append(self._unsettled.get_nowait())
            try:
                for item in ready:
                    await self._acknowledged(item)
                    self._settled(item)
                offsets: dict[TopicPartition, int] = {}
                for item in ready:
                    offsets.update(item.offsets)
                if await self._commit(offsets):
                    self.metrics.offsets_committed.inc(sum(item.messages for item in ready))
                    self._processed.update(offsets)
            finally:
                for _ in ready:
                    self._unsettled.task_done()

    async def _acknowledged(self, batch: _Batch) -> None:
        """Wait for a batch's acknowledgements, re-sending it until the broker has it all."""

        async def wait_or_resend() -> None:
            try:
                await asyncio.gather(*batch.acks)
            except KafkaError:
                batch.acks = []  # the next attempt re-sends; retrying a failed future won't
                raise

        async def attempt() -> None:
            while True:
                if not batch.acks:
                    batch.acks = await self.publisher.send(batch.outputs)
                    batch.sent_after_loss = self._sent_mark()
                await wait_or_resend()
                try:
                    await self._check_outputs_exist(batch)
                except KafkaError:
                    batch.acks = []  # acknowledged by a broker that did not store them
                    raise
                if batch.sent_after_loss == self._losses:
                    return
                # Sent before a topic loss was seen (or during one), acknowledged perhaps
                # into nothing: the topics are back, send it again (duplicates are identical).
                batch.acks = []

        await self.backoff.run(
            attempt, "publishing outputs", (KafkaError,), self._kafka_error("produce")
        )

    async def _check_outputs_exist(self, batch: _Batch) -> None:
        """Refuse to count a batch as published if a topic it wrote to is gone.

        A broker may acknowledge writes to a topic deleted meanwhile and store nothing (the
        bundled broker does); Apache Kafka refuses them, but a topic deleted and re-created
        by auto-creation takes them with other partitions. Asking the brokers (without
        creating anything) after the acknowledgements and before the commit costs one
        metadata round trip per batch, and a batch whose topic is missing is an error:
        logged, retried with backoff (``fraudstream_ready`` 0), re-sent once it is back,
        and its offsets are not committed meanwhile. Batches acknowledged before the loss
        was seen, or while it lasted, are sent again too (``_Batch.sent_after_loss``).

        Raises:
            UnknownTopicOrPartitionError: an output topic does not exist.
        """
        topics = sorted({output.topic for output in batch.outputs})
        if not topics:
            return
        missing = await kafka_preflight.missing_topics(await self._admin_client(), topics)
        if missing:
            if not self._outputs_missing:  # cleared by _watch_outputs once they are back
                self._losses += 1
                self._outputs_missing = True
            named = ", ".join(f"{t} ({self._topic_setting(t)})" for t in missing)
            log.error(
                "output topics %s do not exist: the batch's %d records were not stored; its "
                "offsets stay uncommitted and it is sent again once the topics are back",
                named,
                len(batch.outputs),
            )
            raise UnknownTopicOrPartitionError(f"output topics {named} do not exist")

    def _refuse_while_outputs_missing(self, batch: _Batch) -> None:
        """Fail fast, without a round trip, while :meth:`_watch_outputs` or an earlier
        batch found an output topic missing.

        Raises:
            UnknownTopicOrPartitionError: an output topic was missing at the last check.
        """
        if self._outputs_missing:
            raise UnknownTopicOrPartitionError(
                f"an output topic is missing (see the errors above): the batch's "
                f"{len(batch.outputs)} records are not sent until it is back"
            )

    def _sent_mark(self) -> int:
        """What a batch sent now records in ``sent_after_loss``."""
        return _SENT_WHILE_MISSING if self._outputs_missing else self._losses

    def _topic_setting(self, topic: str) -> str:
        """The setting that names one of the worker's topics."""
        for need in kafka_preflight.topic_needs(self.settings):
            if need.topic == topic:
                return need.setting
        return "unknown setting"

    def _settled(self, batch: _Batch) -> None:
        """Metrics of a batch whose outputs were just acknowledged."""
        acked_s = time.time()
        if batch.local:
            created_ms = np.fromiter(
                (item.message.timestamp_ms for item in batch.local), np.float64, len(batch.local)
            )
            latencies = np.maximum(0.0, acked_s - created_ms / 1000)
            observe_many(self.metrics.end_to_end_latency, latencies)
        labels_rejected = batch.applied.rejected if batch.applied is not None else []
        for r in [*batch.rejected, *batch.unscorable, *labels_rejected]:
            self.metrics.dead_letters.labels(r.error.reason.value).inc()
        self.metrics.events.labels("dead_letter").inc(len(batch.rejected))
        self.metrics.repartitioned.inc(len(batch.forwards))
        self.metrics.batch_size.observe(batch.messages)
        self.metrics.processing.observe(time.perf_counter() - batch.polled_at)

    async def _commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        async def commit() -> bool:
            assignment = self.consumer.assignment()
            owned = {tp: offset for tp, offset in offsets.items() if tp in assignment}
            if not owned:
                return False
            try:
                await self.consumer.commit(owned)
            except (CommitFailedError, IllegalStateError) as exc:
                # The partitions moved to another member, which re-processes from the last
                # commit: duplicates downstream, identical records, nothing lost.
                self.metrics.kafka_errors.labels("commit").inc()
                log.warning("offsets not committed, partitions were reassigned: %s", exc)
                return False
            self.metrics.last_commit_timestamp.set(time.time())
            return True

        return await self.backoff.run(
            commit, "committing offsets", (KafkaError,), self._kafka_error("commit")
        )

    async def _catch_up_positions(self) -> None:
        """While idle with nothing in flight, count as processed what the fetch skipped.

        Under exactly-once every transaction ends with a commit marker, an offset that holds
        no record: the last committed offset stays one short of the high watermark, and the
        lag gauge would read 1 for ever. With nothing buffered, pending or unsettled, every
        record before the consumer's position has been processed, so the position is too.
        """
        if self._pending is not None or not self._unsettled.empty():
            return
        for tp in list(self.consumer.assignment()):
            if self._buffered.get(tp) or self._labels_buffered.get(tp) or tp not in self._processed:
                continue
            position = await self._position_now(tp)
            if position is None:
                continue
            if position > self._processed.get(tp, position):
                self._processed[tp] = position

    async def _report_lag_forever(self) -> None:
        """Refresh the lag gauges on a timer of their own, from the brokers' end offsets.

        The batch loop can be stuck for minutes (a Redis outage: it retries one batch) while
        producers keep writing. The lag must keep growing then, or the lag and no-commit
        alerts cannot fire; the high watermark of the last fetch stops moving when the loop
        stops polling, so the end offsets are asked of the brokers (ListOffsets), and the
        lag is what they hold past this group's committed position.
        """
        while True:
            await asyncio.sleep(_LAG_REFRESH_S)
            try:
                await self._watch_outputs()
                await self._report_lag()
            except KafkaError as exc:
                self.metrics.kafka_errors.labels("admin").inc()
                if not self._lag_failing:  # once per streak: the loop reports the outage
                    log.warning("cannot read the end offsets for the lag gauges (%s)", exc)
                self._lag_failing = True
            else:
                self._lag_failing = False

    async def _watch_outputs(self) -> None:
        """Say at once, loudly, when an output topic disappears (and when it is back).

        Apache Kafka holds writes to a missing topic for the producer's request timeout
        before it fails them, silently meanwhile; this check, every second, logs the
        missing topics at ERROR with the settings that name them and drops
        ``fraudstream_ready`` to 0. Batches sent before it are sent again
        (:meth:`_acknowledged`), and none is committed while a topic it writes is missing
        (:meth:`_check_outputs_exist`).
        """
        s = self.settings
        topics = [
            s.topic_scores,
            s.topic_alerts,
            s.topic_shadow_scores,
            s.topic_dead_letters,
            s.topic_label_dead_letters,
            s.topic_repartition,
        ]
        missing = await kafka_preflight.missing_topics(await self._admin_client(), topics)
        if missing and not self._outputs_missing:
            self._losses += 1
            self.metrics.ready.set(0)
            log.error(
                "output topics %s do not exist: nothing is committed until they are back "
                "(create them, or fix the settings)",
                ", ".join(f"{t} ({self._topic_setting(t)})" for t in missing),
            )
        elif not missing and self._outputs_missing:
            log.info("the output topics exist again")
            self.metrics.ready.set(1)  # a failing loop sets it to 0 again at its next retry
        self._outputs_missing = bool(missing)

    async def _report_lag(self) -> None:
        """Lag of each assigned partition: its end offset minus the committed position."""
        assignment = sorted(self.consumer.assignment())
        if not assignment:
            return
        # Positions first, end offsets after: an end offset is then never older than the
        # position it is compared with, and a position past the end is a real anomaly.
        positions = dict(self._processed)
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
        ends = await self._end_offsets(assignment)
        owned = self.consumer.assignment()
        for tp, end in ends.items():
            position = positions.get(tp)
            if tp not in owned or position is None:  # revoked meanwhile
                continue
            if position > end:
                self._out_of_range.setdefault(tp, position)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(end - position, 0)
            )

    async def _end_offsets(
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

    async def _start_uncommitted(self, error: NoOffsetForPartitionError | None) -> None:
        """A partition without a committed offset starts at its beginning (a new group).

        Unless this worker committed there before: then the group's offsets were deleted
        with the topic (Apache Kafka drops them when a topic is deleted), and a re-created
        topic is what ``FRAUDSTREAM_OFFSET_RESET_POLICY`` is about (:meth:`_reset_offsets`).
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
                before = self._processed.get(partition, 0)
                if before > 0:
                    await self._reset_offsets({partition: before}, confirmed=True)
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
        partitions = [TopicPartition(topic, p) for p in range(self.runtime.partitions[topic])]
        try:
            admin = await self._admin_client()
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

    async def _reset_offsets(self, found: Mapping[TopicPartition, int], *, confirmed: bool) -> None:
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
            self._out_of_range.pop(tp, None)
        owned = [tp for tp in found if tp in self.consumer.assignment()]
        if not owned:
            return
        # What was read before is scored and committed first (the old topic's records:
        # they cannot be read again), so the next commits start from the new position.
        leftover = [polled for tp in owned for polled in self._buffered.pop(tp, ())]
        labels = [label for tp in owned for label in self._labels_buffered.pop(tp, ())]
        if leftover or labels:
            async with self._lock:
                await self._advance(self._prepare(leftover, labels))
        await self.finish_in_flight()
        starts: dict[TopicPartition, int] = await self.consumer.beginning_offsets(owned)
        # A fetch that failed out of range saw the new topic: the old high watermark is moot.
        ends = await self._end_offsets(owned, fetched=not confirmed)
        policy = self.settings.offset_reset_policy
        for tp in owned:
            position = found[tp]
            if not confirmed:
                position = self._processed.get(tp, position)
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
            self._clocks.pop(tp, None)
            if policy == "earliest":
                await self.consumer.seek_to_beginning(tp)
                self._processed[tp] = starts[tp]
            else:
                await self.consumer.seek_to_end(tp)
                self._processed[tp] = ends[tp]
