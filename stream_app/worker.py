"""``fraudstream worker``: the Faust application that scores transactions in real time.

Two inbound paths, one process::

    transactions ─┐  ScoringLoop (aiokafka, micro-batches)      ┌─► scores, alerts
    <repartition> ┘    validate → route → state → score → publish ├─► scores.shadow
                          │                  commit after acks    ├─► transactions.dlq
                          └─ wrong partition: re-key ─────────────┴─► <repartition>
    labels ──────── Faust agent (take_events) → terminal counters ──► labels.dlq

* **Transactions** are consumed with aiokafka directly, in a :class:`ScoringLoop` run as a
  service of the Faust application: Faust's per-event stream machinery costs more than the
  whole 20,000 events/s budget on two cores (see ``WORKER_NOTES.md``). Offsets are
  committed by hand, only once every output of the batch is acknowledged; under
  ``exactly_once`` outputs and offsets commit in one Kafka transaction instead.
* **Labels** (a few percent of the volume) are a Faust agent. Faust acks the events of a
  ``take_events`` batch in a ``finally``, even when the batch failed, so the agent holds an
  extra reference on each message and releases it only on success: a failed batch is
  never committed.

Failures of Redis or Kafka are retried with capped exponential backoff, logged once per
attempt, counted, and reflected in ``fraudstream_ready``; nothing is committed past an
event whose outputs are not acknowledged, so a crash at any point re-processes from the
last commit and yields the same records (see :mod:`stream_app.pipeline`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import heapq
import logging
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import faust
import numpy as np
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, ProducerFenced
from aiokafka.partitioner import murmur2
from mode import Service
from prometheus_client import CollectorRegistry, start_http_server
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from stream_app import kafka_config
from stream_app.config import Settings, unknown_environment
from stream_app.errors import ConfigError, FraudStreamError
from stream_app.metrics import WorkerMetrics, observe_many
from stream_app.model_registry import ModelOptions, ModelRegistry
from stream_app.pipeline import (
    Accepted,
    Inbound,
    Rejected,
    ScoredBatch,
    ScoringPipeline,
    apply_labels,
    validate_transaction,
)
from stream_app.records import TransactionEvent, ValidationLimits, dead_letter_headers
from stream_app.redis_state import RedisStateStore
from stream_app.state import BatchState

log = logging.getLogger(__name__)

T = TypeVar("T")

_BACKOFF_START_S: Final = 0.1
_LAG_REFRESH_S: Final = 1.0  # while idle, the lag gauge is refreshed at most this often
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


class Backoff:
    """Retries an operation until it succeeds, pausing longer each time (capped).

    Args:
        metrics: ``fraudstream_ready`` drops to 0 while retrying, back to 1 on success.
        max_s: The longest pause.
    """

    def __init__(self, metrics: WorkerMetrics, max_s: float) -> None:
        self.metrics = metrics
        self.max_s = max_s

    async def run(
        self,
        operation: Callable[[], Awaitable[T]],
        what: str,
        errors: tuple[type[BaseException], ...],
        on_error: Callable[[BaseException], None],
    ) -> T:
        """Await ``operation()`` until it stops raising ``errors``; other errors propagate."""
        delay = _BACKOFF_START_S
        failed = False
        while True:
            try:
                result = await operation()
            except errors as exc:
                on_error(exc)
                self.metrics.ready.set(0)
                failed = True
                log.warning(
                    "%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_s)
            else:
                if failed:
                    log.info("%s succeeded again", what)
                    self.metrics.ready.set(1)
                return result


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
                re-sends all, which is safe as consumers dedupe by transaction id).
        """
        await asyncio.gather(*await self.send(outputs))


@dataclass(frozen=True, slots=True)
class _Polled:
    """A consumed message, validated, waiting in its partition's buffer."""

    tp: TopicPartition
    outcome: Accepted | Rejected
    clock: float  # the partition's latest event time up to this message: the merge key


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
    state: asyncio.Task[BatchState] | None = None
    outputs: list[Output] = field(default_factory=list)
    acks: list[asyncio.Future[Any]] = field(default_factory=list)


@dataclass
class WorkerRuntime:
    """What the worker is built from: settings, metrics and the serving models."""

    settings: Settings
    metrics: WorkerMetrics
    models: ModelRegistry
    limits: ValidationLimits
    partitions: dict[str, int] = field(default_factory=dict)

    @property
    def state_sequence_length(self) -> int:
        """Transactions the state keeps per customer."""
        if self.settings.state_sequence_length is not None:
            return self.settings.state_sequence_length
        lengths = [self.models.champion.sequence_length]
        if self.models.challenger is not None:
            lengths.append(self.models.challenger.sequence_length)
        return max(lengths)


def redis_client(settings: Settings) -> aioredis.Redis:
    """A Redis client from the settings (TLS with rediss://, password, timeouts)."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 30,
    }
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_ssl_ca_file)
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.redis_url.get_secret_value(), **options
    )
    return client


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, scoring: ScoringLoop) -> None:
        self.scoring = scoring

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # Finish and commit what we hold, so the next owner starts where we stopped.
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
        log.info("scoring partitions assigned: %s", ", ".join(names))
        self.scoring.metrics.ready.set(1)


class ScoringLoop:
    """The transactions path, as three overlapping stages, each in batch order:

    1. **state**: a batch's Redis call is sent as soon as the previous batch's reply is
       back, so Redis works on batch k+1 while Python scores batch k; state calls never
       overlap, which keeps every customer's history in arrival order;
    2. **score and send**: features, model calls and records; outputs are queued to the
       producer without waiting for acknowledgements;
    3. **settle** (a task of its own): waits for each batch's acknowledgements in order,
       re-sends a batch whose outputs failed, and only then commits its offsets.

    At most ``_MAX_UNSETTLED`` batches wait in stage 3; past that, polling waits. Under
    ``exactly_once`` stages 2 and 3 are one Kafka transaction per batch instead.
    """

    def __init__(self, runtime: WorkerRuntime, store: RedisStateStore) -> None:
        self.runtime = runtime
        s = runtime.settings
        self.settings = s
        self.metrics = runtime.metrics
        self.pipeline = ScoringPipeline(
            store,
            runtime.models,
            runtime.metrics,
            max_reasons=s.max_reasons,
            psi_window=s.psi_window,
        )
        self.backoff = Backoff(runtime.metrics, s.retry_backoff_max_s)
        self.source_partitions = runtime.partitions[s.topic_transactions]
        self._lock = asyncio.Lock()
        self._buffered: dict[TopicPartition, deque[_Polled]] = {}
        self._clocks: dict[TopicPartition, float] = {}
        self._drained_at: dict[TopicPartition, float] = {}  # epoch ms, by partition
        self._pending: _Batch | None = None
        self._unsettled: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=_MAX_UNSETTLED)
        self._settler: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._processed: dict[TopicPartition, int] = {}
        self._lag_refreshed = 0.0
        self.consumer = AIOKafkaConsumer(
            **kafka_config.consumer_kwargs(s, s.scoring_group_id),
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        transactional_id = f"{s.group_id}-scoring-{s.instance_id}" if s.exactly_once else None
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
        self.consumer.subscribe(
            [self.settings.topic_transactions, self.settings.topic_repartition],
            listener=_Rebalance(self),
        )

    def _kafka_error(self, operation: str) -> Callable[[BaseException], None]:
        counter = self.metrics.kafka_errors.labels(operation)
        return lambda _exc: counter.inc()

    def _redis_error(self, _exc: BaseException) -> None:
        self.metrics.redis_errors.inc()

    async def run(self) -> None:
        """Consume until :meth:`stop` is called, then finish everything in flight."""
        self._settler = asyncio.create_task(self._settle_forever(), name="settle")
        wait_ms = max(1, int(self.settings.batch_max_wait_s * 1000))
        try:
            while not self._stopping.is_set():
                if self._settler.done():  # it only ends by failing: surface its error
                    self._settler.result()
                # With a batch in flight, take only what is already fetched: never wait.
                timeout = 0 if self._pending is not None else wait_ms
                try:
                    polled = await self._poll(timeout)
                except KafkaError as exc:
                    self.metrics.kafka_errors.labels("consume").inc()
                    log.warning("polling transactions failed (%s); retrying", exc)
                    await asyncio.sleep(_BACKOFF_START_S)
                    continue
                async with self._lock:
                    batch = self._prepare(polled) if polled else None
                    await self._advance(batch)
                if batch is None:
                    self._refresh_lag(force=False)
            await self.finish_in_flight()
        finally:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler

    async def _poll(self, timeout_ms: int) -> list[_Polled]:
        """Up to a batch of validated messages, the earliest events first across partitions.

        aiokafka's ``getmany`` drains one partition's whole fetch (up to a megabyte)
        before the next. Catching up on a backlog, one partition would then run ahead of
        the others in event time, and terminal windows, which count the transactions of
        every partition, would miss some. So each partition's messages are validated and
        buffered (up to a batch each), and a batch takes the earliest by event time: a
        k-way merge in which each partition contributes a prefix, so committed offsets stay
        contiguous. While catching up, a batch also ends where a partition runs dry, and
        the next one first waits for that partition's fetch (:meth:`_align`). Live,
        partitions are caught up, nothing waits, and this is simply arrival order.
        """
        size = self.settings.batch_size
        assignment = self.consumer.assignment()
        for tp in list(self._buffered):
            if tp not in assignment:
                del self._buffered[tp]
                self._drained_at.pop(tp, None)
        for tp in assignment:
            room = size - len(self._buffered.get(tp, ()))
            if room > 0:
                self._buffer(await self.consumer.getmany(tp, timeout_ms=0, max_records=room))
        if timeout_ms and not any(self._buffered.values()):
            self._buffer(await self.consumer.getmany(timeout_ms=timeout_ms, max_records=size))
        catching_up = self._catching_up()
        if catching_up:
            await self._align(assignment)
        heads = [
            (buffer[0].clock, i, tp)
            for i, (tp, buffer) in enumerate(self._buffered.items())
            if buffer
        ]
        heapq.heapify(heads)
        taken: list[_Polled] = []
        while heads and len(taken) < size:
            _, i, tp = heapq.heappop(heads)
            buffer = self._buffered[tp]
            taken.append(buffer.popleft())
            if buffer:
                heapq.heappush(heads, (buffer[0].clock, i, tp))
            else:
                self._drained_at[tp] = time.time() * 1000
                if catching_up:
                    # Its next records are still on the broker: going on with the other
                    # partitions alone would run ahead of them. The next poll waits.
                    break
        return taken

    def _buffer(self, fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        limits = self.runtime.limits
        for tp, records in fetched.items():
            buffer = self._buffered.setdefault(tp, deque())
            clock = buffer[-1].clock if buffer else self._clocks.get(tp, 0.0)
            for r in records:
                message = Inbound(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                outcome = validate_transaction(message, limits)
                if isinstance(outcome, Accepted):
                    # A running maximum: the merge needs each partition's keys in order.
                    clock = max(clock, outcome.event.event_time_s)
                buffer.append(_Polled(tp, outcome, clock))
            self._clocks[tp] = clock

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
        highwater = self.consumer.highwater(tp)
        if highwater is None:  # no fetch answered yet: cannot tell, do not wait
            return False
        fetched_at = self.consumer.last_poll_timestamp(tp) or 0
        if fetched_at <= self._drained_at.get(tp, -1.0):
            return True
        position: int = await self.consumer.position(tp)
        return bool(position < highwater)

    def forget_buffered(self) -> None:
        """Drop records polled but not yet taken (on a rebalance: they will be re-read)."""
        self._buffered.clear()
        self._clocks.clear()
        self._drained_at.clear()

    async def stop(self) -> None:
        """Stop polling; :meth:`run` then finishes what is in flight and returns."""
        self._stopping.set()

    async def close(self) -> None:
        """Leave the consumer group and flush the producer."""
        with contextlib.suppress(KafkaError):
            await self.consumer.stop()
        with contextlib.suppress(KafkaError):
            await self.producer.stop()
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
        if batch is not None and batch.local:
            events = [a.event for a in batch.local]
            batch.state = asyncio.create_task(self.pipeline.update_state(events))
            await asyncio.sleep(0)  # let the call go out before the CPU-bound work below
        if previous is not None:
            await self._score_and_send(previous, state)
        self._pending = batch

    async def _state_of(self, batch: _Batch) -> BatchState | None:
        if batch.state is None:
            return None
        events = [a.event for a in batch.local]
        try:
            return await batch.state
        except RedisError as exc:
            self._redis_error(exc)
            log.warning("updating state failed (%s); retrying", exc)
        return await self.backoff.run(
            lambda: self.pipeline.update_state(events),
            "updating state in Redis",
            (RedisError,),
            self._redis_error,
        )

    def _prepare(self, polled: Sequence[_Polled]) -> _Batch:
        """Route a polled batch and build its dead letters: no I/O."""
        s = self.settings
        offsets: dict[TopicPartition, int] = {}
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
        dlq_partitions = self.runtime.partitions[s.topic_dead_letters]
        dead_letters = [
            Output(
                s.topic_dead_letters,
                r.message.partition % dlq_partitions,  # source order kept per partition
                r.message.key,
                r.message.value or b"",
                dead_letter_headers(
                    r.error, r.message.topic, r.message.partition, r.message.offset
                ),
            )
            for r in rejected
        ]
        return _Batch(
            offsets, len(polled), local, forwards, dead_letters, rejected, time.perf_counter()
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
        for key, payload in zip(keys, scored.shadow_payloads, strict=False):  # none: empty
            shadow = key_partition(key, shadow_n)
            outputs.append(Output(s.topic_shadow_scores, shadow, key, payload))
        return outputs

    def _score(self, events: list[TransactionEvent], state: BatchState | None) -> list[Output]:
        """Features, model calls and records of a batch (in the scoring thread)."""
        scored = self.pipeline.score(events, state) if state is not None else _NOTHING_SCORED
        return self._outputs(scored)

    async def _score_and_send(self, batch: _Batch, state: BatchState | None) -> None:
        """Score a batch and queue its outputs; stage 3 commits it once acknowledged."""
        for swap in self.runtime.models.activate_pending():
            log.info("model swap between batches: %s", swap)
        events = [a.event for a in batch.local]
        outputs = await asyncio.get_running_loop().run_in_executor(
            self._scoring_thread, self._score, events, state
        )
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
        await self._unsettled.put(batch)

    async def _transaction(self, batch: _Batch) -> None:
        try:
            async with self.producer.transaction():
                await self.publisher.publish(batch.outputs)
                await self.producer.send_offsets_to_transaction(
                    dict(batch.offsets), self.settings.scoring_group_id
                )
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
                    self._processed.update(offsets)
                    self._refresh_lag(force=False)
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
            if not batch.acks:
                batch.acks = await self.publisher.send(batch.outputs)
            await wait_or_resend()

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
        for r in batch.rejected:
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

    def _refresh_lag(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._lag_refreshed < _LAG_REFRESH_S:
            return
        self._lag_refreshed = now
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            position = self._processed.get(tp)
            if highwater is None or position is None:
                continue
            lag = max(highwater - position, 0)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)


class ScoringService(Service):
    """Runs the :class:`ScoringLoop` for as long as the Faust application runs.

    On stop (SIGTERM) the loop stops polling and finishes its batch in flight, for at most
    ``shutdown_timeout_s``; past that it is cancelled, and whatever it had not committed is
    re-processed by the next owner of its partitions.
    """

    def __init__(self, runtime: WorkerRuntime, store: RedisStateStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtime = runtime
        self.store = store
        self.scoring: ScoringLoop | None = None
        self._run: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._watch_stop = asyncio.Event()

    async def on_start(self) -> None:
        """Connect, subscribe, and start the loop and the model watcher."""
        self.scoring = ScoringLoop(self.runtime, self.store)
        await self.scoring.start()
        self._run = asyncio.create_task(self._guarded(self.scoring.run()), name="scoring")
        interval = self.runtime.settings.model_poll_interval_s
        self._watch = asyncio.create_task(
            self.runtime.models.watch(interval, self._watch_stop), name="model-watch"
        )
        log.info(
            "scoring %s with model %s",
            self.runtime.settings.topic_transactions,
            self.runtime.models.champion.version,
        )

    async def _guarded(self, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # A bug or a broken model: stop the worker (non-zero exit) rather than go on
            # half-working; everything uncommitted is re-processed after the restart.
            log.exception("the scoring loop failed; stopping the worker")
            await self.crash(exc)

    async def on_stop(self) -> None:
        """Drain: finish the batch in flight, commit, leave the group."""
        self._watch_stop.set()
        if self.scoring is not None:
            await self.scoring.stop()
        if self._run is not None and not self._run.done():
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._run), self.runtime.settings.shutdown_timeout_s
                )
            except TimeoutError:
                log.warning("the batch in flight did not finish in time; it will be redone")
                self._run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._run
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.scoring is not None:
            await self.scoring.close()
        self.runtime.metrics.ready.set(0)
        log.info("scoring stopped")


def build_app(runtime: WorkerRuntime) -> faust.App:
    """The Faust application: the labels agent and the scoring service.

    Topics must exist (:func:`prepare`) before the application starts.
    """
    s = runtime.settings
    app = faust.App(
        s.group_id,
        broker=[f"kafka://{server}" for server in s.bootstrap_servers],
        broker_credentials=kafka_config.faust_credentials(s),
        processing_guarantee=s.processing_guarantee,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        autodiscover=False,
        # No tables: nothing is written there, but Faust would otherwise create
        # ./<id>-data in the working directory.
        datadir=Path(tempfile.gettempdir()) / f"fraudstream-{s.group_id}",
        topic_partitions=s.topic_partitions,
        topic_replication_factor=s.topic_replication_factor,
        topic_allow_declare=s.create_topics,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=1.0,
        # Faust's 60 s defaults suit table recovery, which this app does not have; some
        # brokers (the bundled one) hold the first join for part of the rebalance timeout.
        broker_session_timeout=s.consumer_session_timeout_s,
        broker_rebalance_timeout=s.consumer_session_timeout_s,
        broker_heartbeat_interval=s.consumer_session_timeout_s / 3,
    )
    store = RedisStateStore(
        redis_client(s),
        prefix=s.state_key_prefix,
        sequence_length=runtime.state_sequence_length,
        ttl_s=s.state_ttl_s,
    )
    labels_topic = app.topic(s.topic_labels, key_serializer="raw", value_serializer="raw")
    label_dlq = app.topic(s.topic_label_dead_letters, key_serializer="raw", value_serializer="raw")
    backoff = Backoff(runtime.metrics, s.retry_backoff_max_s)
    metrics = runtime.metrics

    def redis_error(_exc: BaseException) -> None:
        metrics.redis_errors.inc()

    def kafka_error(_exc: BaseException) -> None:
        metrics.kafka_errors.labels("produce").inc()

    async def publish_label_dead_letters(rejected: Sequence[Rejected]) -> None:
        futures = [
            await label_dlq.send(
                key=r.message.key,
                value=r.message.value or b"",
                partition=r.message.partition % runtime.partitions[s.topic_label_dead_letters],
                headers=dead_letter_headers(
                    r.error, r.message.topic, r.message.partition, r.message.offset
                ),
            )
            for r in rejected
        ]
        await asyncio.gather(*futures)

    def record_label_lag(next_offsets: dict[Any, int]) -> None:
        for tp, offset in next_offsets.items():
            with contextlib.suppress(Exception):  # not yet known right after an assignment
                highwater = app.consumer.highwater(tp)
                if highwater is not None:
                    lag = max(highwater - offset, 0)
                    metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

    @app.agent(labels_topic, name="labels")
    async def count_labels(stream: faust.StreamT[bytes]) -> None:
        """Count fraud labels into the terminals' per-day counters, a micro-batch at a time."""
        # take_events is on the concrete Stream, which is what Faust passes in.
        batches = cast("faust.Stream[bytes]", stream).take_events(
            s.batch_size, within=s.batch_max_wait_s
        )
        async for events in batches:
            # Our own reference: Faust acks the batch's events whatever happens below, and
            # this one, released only on success, keeps a failed batch uncommitted.
            for event in events:
                event.message.incref()
            messages = [
                Inbound(
                    e.message.topic,
                    e.message.partition,
                    e.message.offset,
                    e.message.key,
                    e.message.value,
                    int(e.message.timestamp * 1000),
                )
                for e in events
            ]
            outcome = await backoff.run(
                functools.partial(apply_labels, messages, store, runtime.limits, metrics),
                "applying labels in Redis",
                (RedisError,),
                redis_error,
            )
            if outcome.rejected:
                await backoff.run(
                    functools.partial(publish_label_dead_letters, outcome.rejected),
                    "publishing label dead letters",
                    (KafkaError,),
                    kafka_error,
                )
                for r in outcome.rejected:
                    metrics.dead_letters.labels(r.error.reason.value).inc()
            for event in events:
                event.ack()
            record_label_lag({e.message.tp: e.message.offset + 1 for e in events})

    class _Scoring(ScoringService):
        # Faust instantiates services itself (with loop and beacon); bind ours to runtime.
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(runtime, store, **kwargs)

    app.service(_Scoring)
    return app


async def prepare(settings: Settings, metrics: WorkerMetrics) -> dict[str, int]:
    """Wait for Kafka and Redis (retrying), create the topics; returns partition counts.

    Raises:
        ConfigError: a topic is missing with topic creation off, or the repartition topic
            does not match the transactions topic.
    """
    backoff = Backoff(metrics, settings.retry_backoff_max_s)

    def kafka_error(_exc: BaseException) -> None:
        metrics.kafka_errors.labels("admin").inc()

    def redis_error(_exc: BaseException) -> None:
        metrics.redis_errors.inc()

    partitions = await backoff.run(
        lambda: kafka_config.ensure_topics(settings),
        f"connecting to Kafka at {settings.kafka_bootstrap_servers}",
        (KafkaError, OSError),
        kafka_error,
    )
    client = redis_client(settings)
    try:
        await backoff.run(
            functools.partial(ping_redis, client, settings),
            f"connecting to Redis at {settings.redis_display_url}",
            (RedisError, OSError),
            redis_error,
        )
    finally:
        await client.aclose()
    return partitions


async def ping_redis(client: aioredis.Redis, settings: Settings) -> None:
    """PING Redis; wrong credentials or an unverifiable certificate are configuration
    errors (no retry will fix them), an unreachable server is retried by the caller.

    Raises:
        ConfigError: Redis refused the password, or its TLS certificate failed verification.
    """
    where = settings.redis_display_url
    try:
        await client.ping()
    except (AuthenticationError, AuthorizationError) as exc:
        raise ConfigError(
            f"Redis at {where} refused the credentials ({type(exc).__name__}): check the "
            "password in FRAUDSTREAM_REDIS_URL or FRAUDSTREAM_REDIS_PASSWORD"
        ) from None
    except ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS")):
            raise ConfigError(
                f"Redis at {where} requires a password ({str(exc).split()[0]}): set it in "
                "FRAUDSTREAM_REDIS_URL or FRAUDSTREAM_REDIS_PASSWORD"
            ) from None
        raise
    except RedisConnectionError as exc:
        text = f"{exc} {exc.__cause__ or ''}"
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            raise ConfigError(
                f"the TLS certificate of Redis at {where} failed verification: set "
                "FRAUDSTREAM_REDIS_SSL_CA_FILE to the CA that signed it"
            ) from None
        raise


def start_metrics_server(settings: Settings, registry: CollectorRegistry) -> str | None:
    """Serve ``registry`` over HTTP; returns the URL, or None when the port is 0.

    Raises:
        ConfigError: the address cannot be bound.
    """
    if settings.metrics_port == 0:
        return None
    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc}): "
            "set FRAUDSTREAM_METRICS_PORT to a free port, or 0 to turn the endpoint off"
        ) from None
    return f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"


def configure_logging(level: str) -> None:
    """Plain one-line logs on stderr; Faust's own worker setup reuses the level."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # aiokafka logs every reconnection attempt at ERROR; our backoff already says it once.
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))


def run_worker(settings: Settings) -> int:
    """Run the worker until SIGTERM or SIGINT; returns the process exit code.

    Raises:
        ConfigError: a setting is wrong (the CLI turns it into exit code 2).
        ModelError: the champion model cannot serve.
    """
    configure_logging(settings.log_level)
    for name in unknown_environment():
        log.warning("ignoring unknown environment variable %s", name)
    metrics = WorkerMetrics(CollectorRegistry())
    options = ModelOptions(
        review_threshold=settings.review_threshold,
        decline_threshold=settings.decline_threshold,
        onnx_threads=settings.onnx_threads,
        max_sequence_length=settings.state_sequence_length,
    )
    models = ModelRegistry(settings.model_dir, settings.challenger_model_dir, options, metrics)
    models.load_initial()
    url = start_metrics_server(settings, metrics.registry)
    if url:
        log.info("metrics on %s", url)
    limits = ValidationLimits(
        max_payload_bytes=settings.max_payload_bytes,
        max_future=timedelta(seconds=settings.max_clock_skew_s),
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    partitions = loop.run_until_complete(prepare(settings, metrics))
    runtime = WorkerRuntime(settings, metrics, models, limits, partitions)
    # The state keeps this many transactions per customer from now on: a model reloaded
    # later that reads longer sequences is refused rather than fed short histories.
    models.options = dataclasses.replace(options, max_sequence_length=runtime.state_sequence_length)
    app = build_app(runtime)
    worker = faust.Worker(
        app, loop=loop, loglevel=settings.log_level, quiet=True, redirect_stdouts=False
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    return 0
