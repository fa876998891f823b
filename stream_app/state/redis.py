"""Redis state store: :mod:`stream_app.state.store` semantics, one Lua script call a micro-batch.

Keys (``prefix`` is a setting, so several deployments or tests can share one Redis):

* ``{prefix}:c:{customer_id}``: string, the customer's retained history, packed
  :data:`stream_app.state.store.ENTRY_DTYPE` records (48 bytes each);
* ``{prefix}:t2:{terminal_id}``: string, a ring of :data:`stream_app.state.store.TERMINAL_RING_DAYS`
  12-byte day slots (UTC day number, transactions, fraud labels), slot ``day % ring``, then
  as many 192-byte hour slots (the same days' 24 hours of transactions and fraud labels);
  13,056 bytes a terminal. (``{prefix}:t:`` keys held day slots only, feature version 1:
  they are not read, and expire.)
* ``{prefix}:x:{transaction_id}``: string, the transaction's ledger entry (41 bytes: its
  time, amount, customer and terminal digests, and its latest verdict), see
  redis_scripts/ledger.lua;
* ``{prefix}:lp:{transaction_id}``: string, a label waiting for its transaction, and
  ``{prefix}:lpq``: sorted set of those keys by deadline;
* ``{key}:quarantined``: a key found corrupt (another type or size), set aside as it was.

Every key carries a TTL (refreshed on write), which bounds memory; a customer or terminal
unseen for that long starts afresh.

Given a ``redis.asyncio.cluster.RedisCluster`` client, the store keeps the same state on a
Redis Cluster instead: keys carry hash tags and a micro-batch is split into calls that each
touch one slot, as :mod:`stream_app.state.redis_cluster` describes.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Final

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from stream_app import features
from stream_app.state.redis_cluster import DEFAULT_SHARDS, ClusterState, expired_from_reply
from stream_app.state.store import (
    DEFAULT_LABEL_WAIT_S,
    ENTRY_DTYPE,
    LABEL_CODES,
    TERMINAL_RING_DAYS,
    TRIM_SLACK,
    BatchState,
    ExpiredLabel,
    LabelOutcome,
    LabelUpdate,
    TransactionUpdate,
    history_from_records,
    id_hash,
    transaction_hash,
)

_SCRIPTS: Final = resources.files("stream_app.state") / "redis_scripts"
# One event as packed for the script, after its 8-byte hash: time_ms, amount.
_EVENT: Final = struct.Struct("<qd")
# One label as packed for the script: time_ms, customer and terminal digests, reported_at
# ms, verdict, then the length of its source.
_LABEL: Final = struct.Struct("<q8s8sqci")
# How long an expired pending label stays claimed by the worker dead-lettering it.
_PENDING_LEASE_MS: Final = 60_000
# A terminal's ring of day and hour counters (see redis_scripts/terminal_ring.lua).
_DAY_SLOT: Final = np.dtype([("day", "<i4"), ("tx", "<i4"), ("fraud", "<i4")])
_HOUR_SLOT: Final = np.dtype([("tx", "<i4"), ("fraud", "<i4")])
_RING: Final = np.dtype(
    [
        ("days", _DAY_SLOT, (TERMINAL_RING_DAYS,)),
        ("hours", _HOUR_SLOT, (TERMINAL_RING_DAYS, features.HOURS_PER_DAY)),
    ]
)


# Each script, after the shared parts it is built on (redis_scripts/*.lua, in this order).
_PARTS: Final = {
    "apply_transactions": (
        "terminal_ring", "state_header", "terminal_windows", "customer_history", "ledger",
    ),
    "apply_labels": ("terminal_ring", "ledger"),
    "expired_labels": ("terminal_ring", "ledger"),
    "cluster_labels": ("terminal_ring", "ledger", "cluster_outbox"),
    "cluster_customers": (
        "terminal_ring", "state_header", "customer_history", "ledger", "cluster_outbox",
    ),
    "cluster_terminals": ("terminal_ring", "state_header", "terminal_windows"),
}  # fmt: skip
log = logging.getLogger(__name__)


def _log_quarantine(key: str) -> None:
    log.error(
        "state key %r was corrupt (wrong type or size): renamed to %r; "
        "the events it concerns are scored from empty state",
        key,
        f"{key}:quarantined",
    )


# Clients the store works with: one Redis, or a Redis Cluster.
StateClient = aioredis.Redis | RedisCluster


def _script(name: str) -> str:
    """A Lua script with the parts it shares with other scripts put in front of it."""
    return "\n".join(
        (_SCRIPTS / f"{part}.lua").read_text(encoding="utf-8") for part in (*_PARTS[name], name)
    )


class RedisStateStore:
    """Customer and terminal state in Redis; one round trip per micro-batch.

    Args:
        client: a ``redis.asyncio.Redis`` created with ``decode_responses=False``, or a
            ``redis.asyncio.cluster.RedisCluster`` (then the keys carry hash tags and a
            micro-batch is three rounds of per-slot calls, see
            :mod:`stream_app.state.redis_cluster`).
        prefix: key prefix of this deployment.
        sequence_length: the model's ``T``: how many transactions each customer keeps
            at least.
        ttl_s: lifetime of a key after its last write, in seconds.
        label_delay_days: the label delay the terminal windows are shifted by.
        cluster_shards: on a cluster, the customer shards and the terminal shards.
        wait_replicas: on a cluster, replicas each write must reach (``WAIT``) before a
            batch goes on; 0 to not wait.
        wait_timeout_s: on a cluster, how long to wait for them.
        label_wait_s: how long a label for a transaction not seen yet waits for it.
        on_quarantine: called with each key found corrupt and set aside (the worker logs
            and counts it); by default a logged error.
    """

    def __init__(
        self,
        client: StateClient,
        *,
        prefix: str = "fs",
        sequence_length: int = features.DEFAULT_SEQUENCE_LENGTH,
        ttl_s: float = 45 * 86_400,
        label_delay_days: int = features.LABEL_DELAY_DAYS,
        cluster_shards: int = DEFAULT_SHARDS,
        wait_replicas: int = 1,
        wait_timeout_s: float = 1.0,
        label_wait_s: float = DEFAULT_LABEL_WAIT_S,
        on_quarantine: Callable[[str], None] | None = None,
    ) -> None:
        self.on_quarantine = on_quarantine or _log_quarantine
        self.client = client
        self.label_wait_ms = int(label_wait_s * 1000)
        self.prefix = prefix
        self.sequence_length = sequence_length
        self.ttl_ms = int(ttl_s * 1000)
        offsets = features.terminal_window_days(label_delay_days)
        self._header: list[Any] = [
            sequence_length,
            features.CUSTOMER_LOOKBACK_MS,
            self.ttl_ms,
            len(offsets),
            *(bound for pair in offsets for bound in pair),
            TRIM_SLACK,
            TERMINAL_RING_DAYS,
            features.MAX_CUSTOMER_WINDOW_TX,
        ]
        self._cluster: ClusterState | None = None
        if isinstance(client, RedisCluster):
            self._cluster = ClusterState(
                client,
                prefix=prefix,
                header=self._header,
                scripts={
                    name: _script(name)
                    for name in (
                        "cluster_customers",
                        "cluster_terminals",
                        "cluster_labels",
                        "expired_labels",
                    )
                },
                shards=cluster_shards,
                ttl_ms=self.ttl_ms,
                label_delay_days=label_delay_days,
                wait_replicas=wait_replicas,
                wait_timeout_ms=int(wait_timeout_s * 1000),
                label_wait_ms=self.label_wait_ms,
                on_quarantine=self._quarantined,
            )
        self._apply_transactions = client.register_script(_script("apply_transactions"))
        self._apply_labels = client.register_script(_script("apply_labels"))
        self._expired_labels = client.register_script(_script("expired_labels"))

    @property
    def clustered(self) -> bool:
        """Whether the state is on a Redis Cluster."""
        return self._cluster is not None

    def set_label_wait(self, seconds: float) -> None:
        """Change how long a label waits for its transaction (tests, tools)."""
        self.label_wait_ms = int(seconds * 1000)
        if self._cluster is not None:
            self._cluster.label_wait_ms = self.label_wait_ms

    def customer_key(self, customer_id: str) -> str:
        """Key of a customer's history."""
        if self._cluster is not None:
            return self._cluster.customer_key(customer_id)
        return f"{self.prefix}:c:{customer_id}"

    def terminal_key(self, terminal_id: str) -> str:
        """Key of a terminal's day and hour counters."""
        if self._cluster is not None:
            return self._cluster.terminal_key(terminal_id)
        return f"{self.prefix}:t2:{terminal_id}"

    def ledger_key(self, transaction_id: str) -> str:
        """Key of a transaction's ledger entry (on one Redis)."""
        return f"{self.prefix}:x:{transaction_id}"

    def pending_key(self, transaction_id: str) -> str:
        """Key of a label waiting for its transaction (on one Redis)."""
        return f"{self.prefix}:lp:{transaction_id}"

    @property
    def pending_queue(self) -> str:
        """Key of the pending labels' deadlines."""
        return f"{self.prefix}:lpq"

    async def terminal_counts(self, terminal_id: str, hour: int) -> tuple[int, int, int, int]:
        """A terminal's counters as stored: (transactions, fraud labels) of the day of
        ``hour`` (hours since the epoch), then of the hour itself."""
        stored = await self.client.get(self.terminal_key(terminal_id))
        if not isinstance(stored, bytes) or len(stored) != _RING.itemsize:
            return 0, 0, 0, 0
        ring = np.frombuffer(stored, dtype=_RING)[0]
        day, hour_of_day = divmod(hour, features.HOURS_PER_DAY)
        slot = day % TERMINAL_RING_DAYS
        slot_day, day_tx, day_fraud = ring["days"][slot].tolist()
        if slot_day != day:
            return 0, 0, 0, 0
        hour_tx, hour_fraud = ring["hours"][slot, hour_of_day].tolist()
        return int(day_tx), int(day_fraud), int(hour_tx), int(hour_fraud)

    async def apply_transactions(self, updates: Sequence[TransactionUpdate]) -> BatchState:
        """Apply a micro-batch in order and return each event's retained history."""
        if not updates:
            return BatchState(history_from_records([]), np.zeros(0, dtype=bool))
        if self._cluster is not None:
            return await self._cluster.apply_transactions(updates)
        keys: list[str] = [self.pending_queue]
        packed = bytearray()
        for u in updates:
            keys += (
                self.customer_key(u.customer_id),
                self.terminal_key(u.terminal_id),
                self.ledger_key(u.transaction_id),
                self.pending_key(u.transaction_id),
            )
            packed += transaction_hash(u.transaction_id)
            packed += _EVENT.pack(u.time_ms, u.amount)
            packed += id_hash(u.customer_id)
            packed += id_hash(u.terminal_id)
        reply = await self._apply_transactions(keys=keys, args=[*self._header, bytes(packed)])
        flags: bytes = reply[0]
        # Each event's history comes in two parts (stored, new record): joined here, once,
        # and read as one array (one frombuffer per event costs more than the rest).
        parts: list[bytes] = reply[4:]
        lengths = (
            np.fromiter(
                (len(parts[i]) + len(parts[i + 1]) for i in range(0, len(parts), 2)),
                dtype=np.int64,
                count=len(updates),
            )
            // ENTRY_DTYPE.itemsize
        )
        flat = np.frombuffer(b"".join(parts), dtype=ENTRY_DTYPE)
        outcome = np.frombuffer(flags, dtype=np.uint8)
        history = features.HistoryBatch(
            group=np.repeat(np.arange(len(updates), dtype=np.int64), lengths),
            times_ms=flat["time_ms"].astype(np.int64),
            amounts=flat["amount"].astype(np.float64),
            terminal_tx=flat["terminal_tx"].astype(np.int64),
            terminal_fraud=flat["terminal_fraud"].astype(np.int64),
        )
        return BatchState(
            history=history,
            duplicate=outcome == ord("1"),
            conflict=outcome == ord("C"),
            reset=np.frombuffer(reply[1], dtype=np.uint8) == ord("1"),
            quarantined=self._quarantined(reply[2]),
            labels_applied=tuple(LABEL_CODES[chr(c)] for c in reply[3]),
        )

    def _quarantined(self, keys: Sequence[bytes]) -> tuple[str, ...]:
        names = tuple(k.decode(errors="replace") for k in keys)
        for name in names:
            self.on_quarantine(name)
        return names

    async def apply_labels(self, labels: Sequence[LabelUpdate]) -> list[LabelOutcome]:
        """Reconcile labels with the ledger and apply their verdicts, one Redis call (on a
        Redis Cluster, see :meth:`ClusterState.apply_labels`)."""
        if not labels:
            return []
        if self._cluster is not None:
            return await self._cluster.apply_labels(labels)
        keys: list[str] = [self.pending_queue]
        packed = bytearray()
        for label in labels:
            keys += (
                self.terminal_key(label.terminal_id),
                self.ledger_key(label.transaction_id),
                self.pending_key(label.transaction_id),
            )
            packed += _LABEL.pack(
                label.time_ms,
                id_hash(label.customer_id),
                id_hash(label.terminal_id),
                label.reported_ms,
                b"1" if label.is_fraud else b"0",
                len(label.source),
            )
            packed += label.source
        now_ms = int(time.time() * 1000)
        args: list[int | bytes] = [
            self.ttl_ms,
            TERMINAL_RING_DAYS,
            now_ms,
            self.label_wait_ms,
            bytes(packed),
        ]
        reply = await self._apply_labels(keys=keys, args=args)
        self._quarantined(reply[1])
        return [LABEL_CODES[chr(c)] for c in reply[0]]

    async def expired_labels(self, limit: int = 1000) -> list[ExpiredLabel]:
        """Pending labels past their deadline, claimed for a minute (see ``drop_pending``)."""
        now_ms = int(time.time() * 1000)
        if self._cluster is not None:
            return await self._cluster.expired_labels(now_ms, _PENDING_LEASE_MS, limit)
        reply = await self._expired_labels(
            keys=[self.pending_queue], args=[now_ms, _PENDING_LEASE_MS, limit]
        )
        return expired_from_reply(reply)

    async def drop_pending(self, expired: Sequence[ExpiredLabel]) -> None:
        """Forget pending labels once dead-lettered."""
        for key in {e.key for e in expired}:
            # The pending queue is next to the key (on a cluster, in its slot).
            queue = key[: key.index(":lp:")] + ":lpq"
            await self.client.delete(key)
            await self.client.zrem(queue, key)
