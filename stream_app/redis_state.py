"""Redis state store: :mod:`stream_app.state` semantics in one Lua script call per micro-batch.

Keys (``prefix`` is a setting, so several deployments or tests can share one Redis):

* ``{prefix}:c:{customer_id}``: string, the customer's retained history, packed
  :data:`stream_app.state.ENTRY_DTYPE` records (48 bytes each);
* ``{prefix}:t2:{terminal_id}``: string, a ring of :data:`stream_app.state.TERMINAL_RING_DAYS`
  12-byte day slots (UTC day number, transactions, fraud labels), slot ``day % ring``, then
  as many 192-byte hour slots (the same days' 24 hours of transactions and fraud labels);
  13,056 bytes a terminal. (``{prefix}:t:`` keys held day slots only, feature version 1:
  they are not read, and expire.)
* ``{prefix}:l:{transaction_id}``: string, marks a label as counted (dedupe).

Every key carries a TTL (refreshed on write), which bounds memory; a customer or terminal
unseen for that long starts afresh.

Given a ``redis.asyncio.cluster.RedisCluster`` client, the store keeps the same state on a
Redis Cluster instead: keys carry hash tags and a micro-batch is split into calls that each
touch one slot, as :mod:`stream_app.redis_cluster_state` describes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from stream_app import features
from stream_app.redis_cluster_state import DEFAULT_SHARDS, ClusterState
from stream_app.state import (
    ENTRY_DTYPE,
    TERMINAL_RING_DAYS,
    TRIM_SLACK,
    BatchState,
    LabelUpdate,
    TransactionUpdate,
    history_from_records,
    transaction_hash,
)

_SCRIPTS: Final = resources.files("stream_app") / "redis_scripts"
# One event as packed for the script, after its 8-byte hash: time_ms, amount.
_EVENT: Final = struct.Struct("<qd")
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
        "terminal_ring", "state_header", "terminal_windows", "customer_history",
    ),
    "apply_labels": ("terminal_ring",),
    "cluster_customers": ("terminal_ring", "state_header", "customer_history"),
    "cluster_terminals": ("terminal_ring", "state_header", "terminal_windows"),
}  # fmt: skip
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
            :mod:`stream_app.redis_cluster_state`).
        prefix: key prefix of this deployment.
        sequence_length: the model's ``T``: how many transactions each customer keeps
            at least.
        ttl_s: lifetime of a key after its last write, in seconds.
        label_delay_days: the label delay the terminal windows are shifted by.
        cluster_shards: on a cluster, the customer shards and the terminal shards.
        wait_replicas: on a cluster, replicas each write must reach (``WAIT``) before a
            batch goes on; 0 to not wait.
        wait_timeout_s: on a cluster, how long to wait for them.
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
    ) -> None:
        self.client = client
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
        ]
        self._cluster: ClusterState | None = None
        if isinstance(client, RedisCluster):
            self._cluster = ClusterState(
                client,
                prefix=prefix,
                header=self._header,
                scripts={
                    name: _script(name)
                    for name in ("cluster_customers", "cluster_terminals", "apply_labels")
                },
                shards=cluster_shards,
                ttl_ms=self.ttl_ms,
                label_delay_days=label_delay_days,
                wait_replicas=wait_replicas,
                wait_timeout_ms=int(wait_timeout_s * 1000),
            )
        self._apply_transactions = client.register_script(_script("apply_transactions"))
        self._apply_labels = client.register_script(_script("apply_labels"))

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

    def label_key(self, transaction_id: str) -> str:
        """Key marking a transaction's label as counted (on one Redis; on a cluster the key
        also names the terminal's shard: :meth:`ClusterState.label_key`)."""
        return f"{self.prefix}:l:{transaction_id}"

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
        keys: list[str] = []
        packed = bytearray()
        for u in updates:
            keys.append(self.customer_key(u.customer_id))
            keys.append(self.terminal_key(u.terminal_id))
            packed += transaction_hash(u.transaction_id)
            packed += _EVENT.pack(u.time_ms, u.amount)
        reply = await self._apply_transactions(keys=keys, args=[*self._header, bytes(packed)])
        flags: bytes = reply[0]
        # Each event's history comes in two parts (stored, new record): joined here, once,
        # and read as one array (one frombuffer per event costs more than the rest).
        parts: list[bytes] = reply[1:]
        lengths = (
            np.fromiter(
                (len(parts[i]) + len(parts[i + 1]) for i in range(0, len(parts), 2)),
                dtype=np.int64,
                count=len(updates),
            )
            // ENTRY_DTYPE.itemsize
        )
        flat = np.frombuffer(b"".join(parts), dtype=ENTRY_DTYPE)
        duplicate = np.frombuffer(flags, dtype=np.uint8) == ord("1")
        history = features.HistoryBatch(
            group=np.repeat(np.arange(len(updates), dtype=np.int64), lengths),
            times_ms=flat["time_ms"].astype(np.int64),
            amounts=flat["amount"].astype(np.float64),
            terminal_tx=flat["terminal_tx"].astype(np.int64),
            terminal_fraud=flat["terminal_fraud"].astype(np.int64),
        )
        return BatchState(history=history, duplicate=duplicate)

    async def apply_labels(self, labels: Sequence[LabelUpdate]) -> int:
        """Count fraud labels into their terminal's hour; a label seen before counts once."""
        if not labels:
            return 0
        if self._cluster is not None:
            return await self._cluster.apply_labels(labels)
        keys: list[str] = []
        args: list[Any] = [self.ttl_ms, TERMINAL_RING_DAYS]
        for label in labels:
            keys.append(self.terminal_key(label.terminal_id))
            keys.append(self.label_key(label.transaction_id))
            args.append(label.time_ms // features.MS_PER_HOUR)
            args.append("1" if label.is_fraud else "0")
        counted = await self._apply_labels(keys=keys, args=args)
        return int(counted)
