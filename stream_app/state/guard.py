"""Lost state is noticed, said, and rebuilt: the state marker and ``fraudstream rebuild-state``.

The worker's state lives in Redis only. A ``FLUSHALL``, a Redis restarted without
persistence, or a failover to a replica that missed writes would otherwise make it score
every customer and terminal from empty state, silently. So every deployment (key prefix)
keeps one more key, the **state marker** (a hash, no TTL; ``{prefix}:marker``, on a Redis
Cluster ``{prefix}:{marker}``, hash-tagged):

* ``epoch``: a random id, new each time the state is created (by a worker of a fresh
  deployment) or rebuilt (by ``fraudstream rebuild-state``); ``origin`` says which;
  ``created_at`` when (ISO-8601 UTC); ``summary`` what a rebuild read;
* ``writes``: a counter each worker increments at every check, so it only ever grows (by
  more than one increment going back, a replica that missed writes is told from a healthy
  failover that lost the last, unreplicated increment).

:class:`StateGuard` checks it at start-up (the consumer groups have committed offsets but
Redis has no marker: the state was there and is gone) and every
``FRAUDSTREAM_STATE_CHECK_INTERVAL_S`` while running (marker gone; another epoch that no
rebuild wrote; the counter went back: a stale replica). On loss it logs an ERROR saying
what happened and what to run, sets ``fraudstream_state_lost`` to 1 and holds
``fraudstream_ready`` at 0, and the ``FraudstreamStateLost`` alert fires. The worker **keeps
scoring** meanwhile: a score from partial history is a weaker score, but stopping would
approve nothing and decline nothing for every card (or, behind a fail-open gateway,
approve everything unscored); a fraud team would rather have the decline rules and the
model's amount and time features working, flagged, while the state is rebuilt. A rebuild
(a new epoch with origin ``rebuild-state``) clears the flag by itself.

:func:`rebuild_state` pushes transactions and labels, in event-time order (labels at the
time they were reported), through the same :class:`~stream_app.state.redis.RedisStateStore`
methods the worker calls, in batches, after deleting whatever partial state the prefix
holds, then writes a new marker. Its sources: the retained Kafka topics from their start up
to the consumer groups' committed offsets (:func:`topic_updates`), or a transactions file
(the CLI reads it with the offline tools). Run it with the workers stopped: a worker
writing meanwhile would interleave its events with the rebuilt history.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from stream_app.backoff import Backoff
from stream_app.config import Settings
from stream_app.errors import RejectedEvent
from stream_app.kafka import config as kafka_config
from stream_app.metrics import WorkerMetrics
from stream_app.records import ValidationLimits, parse_transaction
from stream_app.scoring.pipeline import Inbound, epoch_ms, label_update
from stream_app.state.redis import RedisStateStore, StateClient
from stream_app.state.store import LabelUpdate, TransactionUpdate

log = logging.getLogger(__name__)

Origin = Literal["worker", "rebuild-state"]
# The readiness hold this module puts on fraudstream_ready while the state is lost.
READY_HOLD: Final = "state lost"
REBUILD_BATCH: Final = 1000
WHAT_TO_DO: Final = (
    "run `fraudstream rebuild-state --from-topics` (or `--data FILE`) with the workers' "
    "settings and the workers stopped; until then every customer and terminal is scored "
    "from the state written since the loss"
)

# Increment the counter only if the marker exists (HINCRBY would create it), and say which
# epoch it belongs to: one atomic step, on one key (one slot on a cluster).
_BEAT: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return {redis.call('HINCRBY', KEYS[1], 'writes', 1), redis.call('HGET', KEYS[1], 'epoch'),
        redis.call('HGET', KEYS[1], 'origin') or ''}
"""


def marker_key(prefix: str, cluster: bool) -> str:
    """The state marker's key: ``{prefix}:marker``, hash-tagged on a Redis Cluster."""
    return f"{prefix}:{{marker}}" if cluster else f"{prefix}:marker"


def store_marker_key(store: RedisStateStore) -> str:
    """The marker key of a state store's deployment."""
    return marker_key(store.prefix, isinstance(store.client, RedisCluster))


@dataclass(frozen=True)
class Marker:
    """The state marker as stored."""

    epoch: str
    origin: str
    created_at: str
    writes: int
    summary: str = ""

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> Marker | None:
        """The marker from ``HGETALL`` (None if absent or without an epoch)."""
        text = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        if not text.get("epoch"):
            return None
        try:
            writes = int(text.get("writes", "0"))
        except ValueError:
            writes = 0
        return cls(
            text["epoch"],
            text.get("origin", ""),
            text.get("created_at", ""),
            writes,
            text.get("summary", ""),
        )


async def read_marker(client: StateClient, key: str) -> Marker | None:
    """The marker at ``key``, None if there is none."""
    fields: dict[Any, Any] = await client.hgetall(key)
    return Marker.parse({_bytes(k): _bytes(v) for k, v in fields.items()})


async def write_marker(client: StateClient, key: str, origin: Origin, summary: str = "") -> str:
    """Write a new marker (a new epoch) and return its epoch."""
    epoch = uuid.uuid4().hex
    created = datetime.now(UTC).isoformat(timespec="seconds")
    mapping: dict[str | bytes, str | bytes] = {
        "epoch": epoch,
        "origin": origin,
        "created_at": created,
        "summary": summary,
    }
    await client.hset(key, mapping=mapping)  # type: ignore[arg-type]
    return epoch


async def start_guard(
    settings: Settings, store: RedisStateStore, metrics: WorkerMetrics, backoff: Backoff
) -> StateGuard:
    """The worker's start-up check (Kafka and Redis retried while unreachable)."""
    guard = StateGuard(store, metrics)

    def redis_error(_exc: BaseException) -> None:
        metrics.redis_errors.inc()

    def kafka_error(_exc: BaseException) -> None:
        metrics.kafka_errors.labels("admin").inc()

    committed = await backoff.run(
        functools.partial(committed_offsets, settings),
        "reading the consumer groups' committed offsets",
        (KafkaError, OSError),
        kafka_error,
    )
    await backoff.run(
        functools.partial(guard.start, bool(committed)),
        "checking the state marker in Redis",
        (RedisError, OSError),
        redis_error,
    )
    return guard


async def committed_offsets(settings: Settings) -> dict[TopicPartition, int]:
    """The offsets the worker's consumer group has committed on its input topics (the
    transactions, repartition and labels topics). Empty for a fresh deployment."""
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        inputs = {
            settings.scoring_group_id: (
                settings.topic_transactions,
                settings.topic_repartition,
                settings.topic_labels,
            ),
        }
        counts = await kafka_config.topic_partitions(
            admin, [t for topics in inputs.values() for t in topics]
        )
        found: dict[TopicPartition, int] = {}
        for group, topics in inputs.items():
            # Partitions named: some brokers (the bundled one) cannot list a whole group's.
            partitions = [TopicPartition(t, p) for t in topics for p in range(counts.get(t, 0))]
            if not partitions:
                continue
            offsets = await admin.list_consumer_group_offsets(group, partitions=partitions)
            for tp, meta in offsets.items():
                if meta.offset >= 0:
                    found[tp] = meta.offset
        return found
    finally:
        await admin.close()


class StateGuard:
    """Checks the state marker at start-up and on a timer; reports a loss, and its end.

    Args:
        store: the worker's state store (its client and prefix).
        metrics: ``fraudstream_state_lost`` and the readiness hold live there.
    """

    def __init__(self, store: RedisStateStore, metrics: WorkerMetrics) -> None:
        self.client = store.client
        self.prefix = store.prefix
        self.key = store_marker_key(store)
        self.metrics = metrics
        self.epoch: str | None = None
        self.writes = 0
        self.lost: str | None = None  # why, while lost
        self._beat = self.client.register_script(_BEAT)

    async def start(self, state_expected: bool) -> None:
        """The start-up check.

        Args:
            state_expected: the consumer groups have committed offsets, so state was
                written before; without a marker (and without any state key: a
                deployment from before markers) it is gone. Otherwise this is a fresh
                deployment and the worker creates the marker.
        """
        marker = await read_marker(self.client, self.key)
        if marker is None and state_expected:
            if not await self._any_state_key():
                self._lose(
                    "the consumer groups have committed offsets but Redis holds no state "
                    f"under {self.prefix}:* and no state marker ({self.key}): Redis lost "
                    "this deployment's state (FLUSHALL, a restart without persistence, or "
                    "a failover to an empty replica)"
                )
                return
            log.warning(
                "state keys under %s:* but no state marker: adopting it (written before state "
                "markers existed); from now on its loss is detected",
                self.prefix,
            )
        if marker is None:
            # HSETNX: of several workers starting at once, one creates it.
            created = await self.client.hsetnx(self.key, "epoch", uuid.uuid4().hex)
            if created:
                await self.client.hset(
                    self.key,
                    mapping={
                        "origin": "worker",
                        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    },
                )
                log.info("created the state marker %s", self.key)
            marker = await read_marker(self.client, self.key)
            assert marker is not None
        self._adopt(marker)

    async def _any_state_key(self) -> bool:
        async for _key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            return True
        return False

    def _adopt(self, marker: Marker) -> None:
        self.epoch = marker.epoch
        self.writes = marker.writes
        log.info(
            "state marker %s: epoch %s (%s, %s)",
            self.key,
            marker.epoch[:8],
            marker.origin or "unknown origin",
            marker.created_at or "time unknown",
        )

    async def check(self) -> None:
        """One check while running: the marker is there, of our epoch, its counter grows."""
        reply: Any = await self._beat(keys=[self.key], args=[])
        if reply is None:
            if self.lost is None:
                self._lose(
                    f"the state marker {self.key} is gone: Redis lost this deployment's "
                    "state while the worker ran (FLUSHALL, a restart without persistence, "
                    "or a failover to an empty replica)"
                )
            return
        writes, epoch, origin = int(reply[0]), _text(reply[1]), _text(reply[2])
        if epoch != self.epoch:
            if origin == "rebuild-state":
                marker = await read_marker(self.client, self.key)
                summary = f" ({marker.summary})" if marker is not None and marker.summary else ""
                log.warning(
                    "the state was rebuilt by fraudstream rebuild-state%s: scoring from it",
                    summary,
                )
                self.epoch, self.writes = epoch, writes
                self._recover()
                return
            if self.lost is None:
                self._lose(
                    f"the state marker {self.key} changed epoch ({(self.epoch or '-')[:8]} -> "
                    f"{epoch[:8]}) without a rebuild: this Redis holds another state than "
                    "the one this worker wrote"
                )
            return
        # Our increment on top of what we saw last must exceed it: one increment lost is
        # tolerated (asynchronous replication may lose the last one, a check interval ago,
        # in a failover that kept every state write: those are WAITed on a cluster), two
        # are a replica that missed writes.
        if writes < self.writes and self.lost is None:
            self._lose(
                f"the state marker's write counter went back ({self.writes} -> {writes}): "
                "Redis failed over to a replica that missed writes"
            )
            return
        self.writes = writes

    def _lose(self, why: str) -> None:
        self.lost = why
        self.metrics.state_lost.set(1)
        self.metrics.ready.hold(READY_HOLD)
        log.error("STATE LOST: %s. The worker keeps scoring, flagged; %s", why, WHAT_TO_DO)

    def _recover(self) -> None:
        if self.lost is not None:
            log.warning("state lost no more: the rebuilt state is in place")
        self.lost = None
        self.metrics.state_lost.set(0)
        self.metrics.ready.release(READY_HOLD)

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        """Check every ``interval_s`` until ``stop`` is set; an unreachable Redis is the
        scoring loop's to report (it retries), here it only postpones the check."""
        failing = False
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            if stop.is_set():
                break
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage: the scoring loop logs its own retries
                    log.warning(
                        "checking the state marker failed (%s: %s); retrying every %.0f s",
                        type(exc).__name__,
                        exc,
                        interval_s,
                    )
                failing = True
            else:
                if failing:
                    log.info("checking the state marker works again")
                failing = False


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


# --- rebuild -----------------------------------------------------------------------------


@dataclass
class Updates:
    """What a rebuild applies: transactions and labels, with the time each took effect."""

    transactions: list[tuple[int, int, TransactionUpdate]]  # (time, source order, update)
    labels: list[tuple[int, int, LabelUpdate]]  # (reported time, source order, label)
    rejected: int = 0  # messages that fail the worker's validation (it dead-letters them)
    source: str = ""

    def ordered(self) -> list[TransactionUpdate | LabelUpdate]:
        """Event-time order (a customer's events in their order); labels at the time they
        were reported, before transactions of the same millisecond (they were known then)."""
        keyed: list[tuple[int, int, int, TransactionUpdate | LabelUpdate]] = [
            (t, 0, n, label) for t, n, label in self.labels
        ]
        keyed += [(t, 1, n, tx) for t, n, tx in self.transactions]
        keyed.sort(key=lambda item: (item[0], item[1], item[2]))
        return [item[3] for item in keyed]


def transaction_update(raw: bytes, limits: ValidationLimits) -> TransactionUpdate:
    """The state update of one transactions-topic message, as the worker makes it.

    Raises:
        RejectedEvent: the worker would dead-letter it.
    """
    e = parse_transaction(raw, limits)
    return TransactionUpdate(
        e.transaction_id, e.customer_id, e.terminal_id, epoch_ms(e.timestamp), e.amount
    )


async def topic_updates(settings: Settings, limits: ValidationLimits) -> Updates:
    """Every transaction and label the worker had consumed: its input topics from their
    start up to the consumer groups' committed offsets (what it scored and counted).

    Transactions forwarded through the repartition topic are read where they first came
    in, on the transactions topic.
    """
    committed = await committed_offsets(settings)
    updates = Updates([], [])
    consumer = AIOKafkaConsumer(
        **kafka_config.client_kwargs(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
    )
    await consumer.start()
    try:
        wanted = {
            tp: end
            for tp, end in committed.items()
            if tp.topic in (settings.topic_transactions, settings.topic_labels) and end > 0
        }
        if wanted:
            consumer.assign(list(wanted))
            await consumer.seek_to_beginning(*wanted)
        order = 0
        left = dict(wanted)
        while left:
            batch = await consumer.getmany(*left, timeout_ms=1000, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    if tp not in left or record.offset >= left[tp]:
                        continue
                    order += 1
                    try:
                        if tp.topic == settings.topic_transactions:
                            tx = transaction_update(record.value or b"", limits)
                            updates.transactions.append((tx.time_ms, order, tx))
                        else:
                            inbound = Inbound(
                                tp.topic,
                                tp.partition,
                                record.offset,
                                record.key,
                                record.value,
                                record.timestamp,
                            )
                            label = label_update(inbound, limits)
                            updates.labels.append((label.reported_ms, order, label))
                    except RejectedEvent:
                        updates.rejected += 1
            for tp in list(left):
                if await consumer.position(tp) >= left[tp]:
                    del left[tp]
    finally:
        await consumer.stop()
    updates.source = (
        "topics up to the committed offsets ("
        + ", ".join(f"{tp.topic}[{tp.partition}]<{end}" for tp, end in sorted(wanted.items()))
        + ")"
    )
    return updates


@dataclass(frozen=True)
class RebuildReport:
    """What :func:`rebuild_state` did."""

    deleted_keys: int
    transactions: int
    labels: int
    rejected: int
    seconds: float
    epoch: str

    def __str__(self) -> str:
        return (
            f"rebuilt the state from {self.transactions:,} transactions and {self.labels:,} "
            f"labels in {self.seconds:.1f} s ({self.deleted_keys:,} stale keys deleted, "
            f"{self.rejected:,} invalid messages skipped as the worker skips them); "
            f"new state epoch {self.epoch[:8]}"
        )


async def delete_state(store: RedisStateStore) -> int:
    """Delete every key under the store's prefix (on a cluster, on every primary)."""
    deleted = 0
    batch: list[Any] = []
    async for key in store.client.scan_iter(match=f"{store.prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await _unlink(store.client, batch)
            batch = []
    if batch:
        deleted += await _unlink(store.client, batch)
    return deleted


async def _unlink(client: StateClient, keys: Sequence[Any]) -> int:
    if isinstance(client, RedisCluster):  # keys of many slots: one call each
        return sum([int(await client.unlink(key)) for key in keys])
    return int(await client.unlink(*keys))


async def rebuild_state(
    store: RedisStateStore, updates: Updates, *, batch_size: int = REBUILD_BATCH
) -> RebuildReport:
    """Replace the prefix's state with the one ``updates`` lead to, then write a new marker.

    The marker is deleted first, so a worker still running reports the state lost until
    the new one is written; then the prefix's keys are deleted, the updates applied in
    order (runs of transactions, runs of labels, ``batch_size`` at most per call) with the
    store's own methods, and the marker written with origin ``rebuild-state``.
    """
    started = time.perf_counter()
    key = store_marker_key(store)
    await store.client.delete(key)
    deleted = await delete_state(store)
    run: list[TransactionUpdate | LabelUpdate] = []

    async def flush() -> None:
        if not run:
            return
        if isinstance(run[0], TransactionUpdate):
            await store.apply_transactions([u for u in run if isinstance(u, TransactionUpdate)])
        else:
            await store.apply_labels([u for u in run if isinstance(u, LabelUpdate)])
        run.clear()

    for update in updates.ordered():
        if run and (type(update) is not type(run[0]) or len(run) >= batch_size):
            await flush()
        run.append(update)
    await flush()
    summary = (
        f"{len(updates.transactions)} transactions and {len(updates.labels)} labels from "
        f"{updates.source}"
    )
    epoch = await write_marker(store.client, key, "rebuild-state", summary)
    return RebuildReport(
        deleted_keys=deleted,
        transactions=len(updates.transactions),
        labels=len(updates.labels),
        rejected=updates.rejected,
        seconds=time.perf_counter() - started,
        epoch=epoch,
    )
