"""The worker's one Kafka path: transactions and labels, in micro-batches, applied in Redis,
scored, published, committed (see :class:`ScoringLoop`).

One consumer group (``FRAUDSTREAM_GROUP_ID`` + ``.scoring``) reads the transactions, the
repartition and the labels topics; one producer publishes every output (scores, alerts,
shadow scores, both dead-letter topics, re-keyed forwards); one commit path commits a
message's offset only once its effect is in Redis and its outputs are acknowledged (under
``exactly_once``, in the same Kafka transaction as the outputs); one lag gauge covers every
partition the group reads.

A batch holds the transactions taken by the event-time merge
(:class:`~stream_app.worker.merge.EventTimeMerge`) and the labels fetched meanwhile. Its
state call applies the labels first (:func:`~stream_app.scoring.pipeline.apply_labels`: a
label applied twice counts once), then the transactions; invalid or mismatched labels go to
the labels dead-letter topic with the batch's other outputs. A Redis outage therefore holds
labels exactly as it holds transactions: retried, never committed unapplied.

This module is the path of one batch, top to bottom: :meth:`ScoringLoop.run` polls,
:meth:`~ScoringLoop._prepare` routes, :meth:`~ScoringLoop._advance` overlaps the state call
of one batch with the scoring and sending of the one before
(:meth:`~ScoringLoop._score_and_send`), and :meth:`~ScoringLoop._settle_forever` (or, under
``exactly_once``, :meth:`~ScoringLoop._transaction`) commits. What it leans on lives next
to it, one concern a module:

- :mod:`~stream_app.worker.merge`: the partitions' buffers and their event-time merge;
- :mod:`~stream_app.worker.labels_backlog`: labels before a backlog, after an assignment;
- :mod:`~stream_app.worker.offsets`: where a partition starts (no commit, out of range);
- :mod:`~stream_app.worker.membership`: rebalances, stalls, the group generation check;
- :mod:`~stream_app.worker.outputs`: the records a batch publishes, and their partitions;
- :mod:`~stream_app.worker.output_topics`: output topics that disappear;
- :mod:`~stream_app.worker.lag`: the consumer lag gauges.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    ProducerFenced,
)
from redis.exceptions import RedisError

from stream_app.backoff import BACKOFF_START_S, Backoff, describe_error, fatal_kafka_error
from stream_app.errors import FraudStreamError
from stream_app.kafka import config as kafka_config
from stream_app.kafka.fencing import GroupFencedError, fence_by_generation
from stream_app.kafka.publisher import Output, Publisher
from stream_app.metrics import observe_many
from stream_app.records import TransactionEvent
from stream_app.scoring.controls import ControlsFeed
from stream_app.scoring.pipeline import (
    Accepted,
    Inbound,
    LabelBatch,
    Rejected,
    ScoredBatch,
    ScoringPipeline,
    apply_labels,
)
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import BatchState
from stream_app.worker.admin import SharedAdmin
from stream_app.worker.labels_backlog import LABELS_POLL_S, LabelsBacklog
from stream_app.worker.lag import LagReporter
from stream_app.worker.membership import Membership, RebalanceListener, StaleBatch
from stream_app.worker.merge import EventTimeMerge, Polled
from stream_app.worker.offsets import Offsets
from stream_app.worker.output_topics import OutputTopics
from stream_app.worker.outputs import OutputRecords
from stream_app.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

_NOTHING_SCORED: Final = ScoredBatch.empty()
# Batches scored and sent but not yet acknowledged and committed. Enough to keep the
# producer busy while the next batches are scored; bounded so an outage stops polling.
_MAX_UNSETTLED: Final = 4
_METADATA_MAX_AGE_MS: Final = 5_000


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
    # OutputTopics.losses when the outputs were sent (OutputTopics.sent_mark): a loss seen
    # since means they must be sent again.
    sent_after_loss: int = 0


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
        self.records = OutputRecords(s, runtime.partitions)
        self._lock = asyncio.Lock()
        self._pending: _Batch | None = None
        self._unsettled: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=_MAX_UNSETTLED)
        self._settler: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._lag_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.consumer = AIOKafkaConsumer(
            **{
                **kafka_config.consumer_kwargs(s, s.scoring_group_id),
                # Never reset a position silently: a partition without a commit starts at
                # its beginning, and one whose position is out of range (its topic deleted
                # and re-created) goes through Offsets.reset, logged and counted.
                "auto_offset_reset": "none",
                # A topic deleted and re-created is seen (and re-assigned) within seconds,
                # not at aiokafka's default five-minute metadata refresh.
                "metadata_max_age_ms": _METADATA_MAX_AGE_MS,
            },
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        self.admin = SharedAdmin(s)
        self.merge = EventTimeMerge(self.consumer, s, runtime.limits)
        self.offsets = Offsets(
            self.consumer,
            s,
            runtime.partitions,
            runtime.metrics,
            self.admin,
            self.merge,
            self.process_now,
        )
        self.labels_backlog = LabelsBacklog(
            s, runtime.partitions, runtime.metrics, self.admin, self.offsets
        )
        self.output_topics = OutputTopics(s, runtime.metrics, self.admin)
        self.lag = LagReporter(self.consumer, runtime.metrics, self.offsets)
        self.membership = Membership(self.consumer, s)
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
            listener=RebalanceListener(
                self.membership,
                self.metrics,
                finish_in_flight=self.finish_in_flight,
                forget_buffered=self.merge.forget,
                forget_lag=self.lag.forget,
                assigned=self._assigned,
            ),
        )
        if self.settings.exactly_once:
            # Offsets go with the group generation: a stale member's batch cannot commit.
            fence_by_generation(self.producer, self.membership.group)

    async def run(self) -> None:
        """Consume until :meth:`stop` is called, then finish everything in flight."""
        self._settler = asyncio.create_task(self._settle_forever(), name="settle")
        self._lag_task = asyncio.create_task(
            self.lag.run_forever(also=self.output_topics.watch), name="consumer-lag"
        )
        controls = asyncio.create_task(self.controls.run(), name="controls")
        if self.settings.exactly_once:
            self._watchdog = asyncio.create_task(
                self.membership.watch_stalls(), name="stall-watchdog"
            )
        wait_ms = max(1, int(self.settings.batch_max_wait_s * 1000))
        poll_pause = BACKOFF_START_S
        try:
            while not self._stopping.is_set():
                if self._settler.done():  # it only ends by failing: surface its error
                    self._settler.result()
                if self.labels_backlog.pending:
                    self.labels_backlog.pending = False
                    # Every partition without a commit starts now, all together: waiting
                    # for each one's NoOffsetForPartitionError would start them one by
                    # one, and the event-time merge would run ahead on the first ones.
                    await self.offsets.start_uncommitted(None)
                    await self.labels_backlog.measure()
                if self.offsets.out_of_range:
                    await self.offsets.reset(dict(self.offsets.out_of_range), confirmed=False)
                labels_only = await self.labels_backlog.waiting()
                # With a batch in flight, take only what is already fetched: never wait.
                # Waiting for the labels backlog, wait as long as between two checks.
                idle_ms = int(LABELS_POLL_S * 1000) if labels_only else wait_ms
                timeout = 0 if self._pending is not None else idle_ms
                rebalances = self.membership.rebalances
                try:
                    polled, labels = await self.merge.poll(timeout, labels_only=labels_only)
                except NoOffsetForPartitionError as exc:
                    # A partition this group never committed: read it from the start.
                    await self.offsets.start_uncommitted(exc)
                    continue
                except OffsetOutOfRangeError as exc:
                    await self.offsets.reset(dict(exc.args[0]), confirmed=True)
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
                    if rebalances != self.membership.rebalances and (polled or labels):
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
                    if self._pending is None and self._unsettled.empty():
                        await self.offsets.catch_up()
            await self.finish_in_flight()
        finally:
            self.controls.stop()
            for task in (self._settler, self._watchdog, self._lag_task, controls):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def _prepare(self, polled: Sequence[Polled], labels: Sequence[Inbound] = ()) -> _Batch:
        """Route a polled batch and build its dead letters: no I/O."""
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
        local, forwards = self.records.route(accepted)
        dead_letters = [self.records.dead_letter(r) for r in rejected]
        return _Batch(
            offsets,
            len(polled) + len(labels),
            local,
            forwards,
            dead_letters,
            rejected,
            time.perf_counter(),
            list(labels),
            self.membership.generation(),
        )

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
            except StaleBatch as exc:
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

    async def _score_and_send(self, batch: _Batch, state: BatchState | None) -> None:
        """Score a batch and queue its outputs; stage 3 commits it once acknowledged."""
        for swap in self.runtime.models.activate_pending():
            log.info("model swap between batches: %s", swap)
        events = [a.event for a in batch.local]
        outputs, scored = await asyncio.get_running_loop().run_in_executor(
            self._scoring_thread, self._score, events, state
        )
        if scored.unscorable or scored.conflicting:
            version = self.runtime.models.champion.version
            refused = self.records.refused(batch.local, scored, version)
            batch.unscorable += refused
            batch.dead_letters += [self.records.dead_letter(r) for r in refused]
        if batch.applied is not None:
            label_dlq = self.settings.topic_label_dead_letters
            batch.dead_letters += [
                self.records.dead_letter(r, label_dlq) for r in batch.applied.rejected
            ]
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
            self.offsets.processed.update(batch.offsets)
            return
        batch.acks = await self.backoff.run(
            lambda: self.publisher.send(batch.outputs),
            "queueing outputs",
            (KafkaError,),
            self._kafka_error("produce"),
        )
        batch.sent_after_loss = self.output_topics.sent_mark()
        await self._unsettled.put(batch)

    def _score(
        self, events: list[TransactionEvent], state: BatchState | None
    ) -> tuple[list[Output], ScoredBatch]:
        """Features, model calls and records of a batch (in the scoring thread)."""
        scored = self.pipeline.score(events, state) if state is not None else _NOTHING_SCORED
        return self.records.scored(scored), scored

    async def _transaction(self, batch: _Batch) -> None:
        try:
            async with self.producer.transaction():
                # No transaction while an output topic is known to be missing: Apache
                # Kafka refuses its records only after the producer's request timeout,
                # and what a re-created topic takes meanwhile must not outlive an abort
                # (Publisher.publish lets no send retry past it).
                self.output_topics.refuse_while_missing(batch.outputs)
                await self.publisher.publish(batch.outputs)
                await self.producer.send_offsets_to_transaction(
                    dict(batch.offsets), self.settings.scoring_group_id
                )
                # Raising here aborts the transaction.
                self.membership.check(batch.polled_at, batch.generation)
        except GroupFencedError as exc:
            # The group coordinator refused the offsets (a stale generation): aborted.
            raise StaleBatch(str(exc)) from exc
        except ProducerFenced as exc:
            # Another instance with our transactional id took over: we must not go on.
            raise FraudStreamError(
                f"this worker's producer was fenced ({exc}): is FRAUDSTREAM_INSTANCE_ID "
                "shared by two running workers?"
            ) from exc

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
                    self.offsets.processed.update(offsets)
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
                    batch.sent_after_loss = self.output_topics.sent_mark()
                await wait_or_resend()
                try:
                    await self.output_topics.check_exist(batch.outputs)
                except KafkaError:
                    batch.acks = []  # acknowledged by a broker that did not store them
                    raise
                if batch.sent_after_loss == self.output_topics.losses:
                    return
                # Sent before a topic loss was seen (or during one), acknowledged perhaps
                # into nothing: the topics are back, send it again (duplicates are identical).
                batch.acks = []

        await self.backoff.run(
            attempt, "publishing outputs", (KafkaError,), self._kafka_error("produce")
        )

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

    async def _rewind(self, batch: _Batch | None, reason: StaleBatch) -> None:
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
        self.membership.settled()

    async def _reread_from_committed(self) -> None:
        """Drop what is buffered and move every assigned partition back to its committed
        offset (the beginning when nothing is committed: ``auto_offset_reset`` earliest)."""
        self.merge.forget()

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

    def _assigned(self) -> None:
        """Partitions were assigned: the labels published so far go first (see
        :mod:`stream_app.worker.labels_backlog`), and partitions without a commit start."""
        self.labels_backlog.pending = True

    async def finish_in_flight(self) -> None:
        """Score, publish and commit everything polled (before a rebalance or a stop)."""
        async with self._lock:
            await self._advance(None)
        if self._settler is not None and not self._settler.done():
            await self._unsettled.join()

    async def process_now(self, polled: Sequence[Polled], labels: Sequence[Inbound]) -> None:
        """Score, publish and commit ``polled`` and ``labels`` at once, and everything in
        flight: before a partition's position moves, what was read of it is committed."""
        if polled or labels:
            async with self._lock:
                await self._advance(self._prepare(polled, labels))
        await self.finish_in_flight()

    async def publish_label_dead_letters(self, rejected: Sequence[Rejected]) -> None:
        """Publish labels' dead letters outside a batch (the expired labels' sweep), with
        the loop's producer: between two batches, and under ``exactly_once`` in a Kafka
        transaction of their own (the producer is transactional).

        Raises:
            KafkaError: some dead letter was not acknowledged (the caller retries later).
        """
        topic = self.settings.topic_label_dead_letters
        outputs = [self.records.dead_letter(r, topic) for r in rejected]
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
        await self.admin.close()
        self._scoring_thread.shutdown(wait=True)

    def _kafka_error(self, operation: str) -> Callable[[BaseException], None]:
        counter = self.metrics.kafka_errors.labels(operation)
        return lambda _exc: counter.inc()

    def _redis_error(self, _exc: BaseException) -> None:
        self.metrics.redis_errors.inc()
