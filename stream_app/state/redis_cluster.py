"""State on a Redis Cluster: :mod:`stream_app.state.store` semantics, every Lua call on one slot.

On one Redis a micro-batch is one script call touching every customer and terminal key it
names (:mod:`stream_app.state.redis`). A cluster refuses a call whose keys span slots, so
here every key carries a hash tag: a customer's keys that of its **customer shard**
(``crc32(customer_id) % shards``), a terminal's keys that of its **terminal shard**. The tags
are chosen so the shards' slots are spread evenly over the 16,384 slots, hence over the
primaries. A micro-batch costs three rounds of calls, one call per shard touched in each,
sent together (one pipeline, the nodes in parallel):

1. **terminal shards**: the window counts each event will be scored with (read only);
2. **customer shards**: dedupe each event against its customer's history, in order; a new
   event is appended with the counts of step 1 and, in the same atomic call, its terminal
   increment (terminal id, hour, batch number) goes to the shard's **outbox**; the call
   returns each event's history (a duplicate gets its first inputs back) and the outbox;
3. **terminal shards**: count the outbox increments, and record per customer shard the
   last batch number counted (a hash per terminal shard). A batch at or below the one
   recorded is skipped, so an increment is counted once however often it is sent.

The outbox makes the split safe. A worker that dies between steps 2 and 3 leaves the
increments in the outbox; the redelivered events are duplicates at step 2, which returns the
outbox still holding them, and step 3 counts them then. A worker that dies after step 3 but
before its offsets are committed sends them again: skipped. Every step 2 returns the whole
outbox (another worker's pending increments included) and every step 3 sends all of it, so a
batch number recorded at a terminal shard means every earlier batch of that customer shard
was counted there too; the outbox entries a worker saw counted are dropped by its next step 2
on that shard. Batch numbers come from the customer shard's clock in microseconds (at least
the last one + 1): they grow even after their key expired.

Between step 2 and the step 3 that counts an increment, window reads do not see it; windows
end seven days (the label delay) before the event, so only an event at least that much later
in event time could miss it. Within a micro-batch, events are cut into parts so that no event
reads an hour an earlier event of its part counts (a part spans less than the label delay);
step 3 of one part and step 1 of the next are one call. So a worker that does not die scores
exactly as on one Redis; after a crash, increments left in an outbox reach the terminal
counters with the next batch touching that customer shard (normally the redelivered one).

Durability: a cluster replicates asynchronously, and a primary killed before its replica
received a write is replaced by a replica without it. With ``wait_replicas`` > 0, every call
that may write is followed, on the same connection, by a small write and ``WAIT``: the batch
goes on (and its offsets get committed) only once that many replicas of each primary written
to hold everything written before. A replica that does not confirm within the wait timeout
makes the batch fail with :class:`StateReplicationError` (a ``RedisError``: the worker retries
it; every step is idempotent). ``appendfsync always`` on the nodes makes each node's own AOF
durable too; ``WAIT`` is about the replica's memory (Redis 7.2's ``WAITAOF`` would wait for
its AOF as well).

The transaction ledger and pending labels live in the customer's shard, next to its
history, so step 2 checks and enters each transaction atomically (an id reused under a
customer of another shard is not seen there: it is scored, as a new transaction of that
customer). A micro-batch of labels is one call per customer shard: each label is checked
against its transaction's ledger entry and its verdict recorded there, and the change to
the terminal's fraud counter goes to the shard's outbox as a transaction's increment does,
then step 3 counts it at the terminal shard (a label waiting for its transaction adds its
change after that transaction's increment). The outbox makes labels as safe as
transactions against a worker dying between the two calls.
Shards hash the ids, not the Kafka partition, so
adding partitions or workers moves no state.

The scripts build customer and terminal key names from the shard's key prefix (passed once)
and the ids; only the shard's own keys are passed as ``KEYS``. redis-py's cluster client
hashes every key passed to check they share a slot, which cost more client CPU than all the
rest of a batch; every key a script touches still carries the shard's tag, so it is on the
slot the call was routed to.

Keys (``{tag}`` a shard's hash tag, e.g. ``{c3.7}``):

* ``{prefix}:{c…}:c:{customer_id}``: the customer's history (as on one Redis);
* ``{prefix}:{c…}:x:{transaction_id}``: a transaction's ledger entry;
  ``{prefix}:{c…}:lp:{transaction_id}`` and ``{prefix}:{c…}:lpq``: labels waiting for their
  transaction, and their deadlines;
* ``{prefix}:{c…}:q``: the customer shard's outbox; ``{prefix}:{c…}:b``: its last batch number;
* ``{prefix}:{t…}:t2:{terminal_id}``: the terminal's ring of day and hour counters;
* ``{prefix}:{t…}:w``: per customer shard, the last batch counted in this terminal shard;
* ``{prefix}:{…}:f``: the write a ``WAIT`` follows.

The number of shards fixes the key names: changing it starts the state afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from stream_app import features
from stream_app.state.store import (
    ENTRY_DTYPE,
    LABEL_CODES,
    BatchState,
    ExpiredLabel,
    LabelOutcome,
    LabelUpdate,
    TransactionUpdate,
    id_hash,
    transaction_hash,
)

MAX_SHARDS: Final = 1024
# Each shard a batch touches costs a call in each step: 2-3 shards per primary of a
# 3-primary cluster (measured: 4 shards cost 20 % less Redis CPU an event than 16).
DEFAULT_SHARDS: Final = 8
# Step 3's increments: customer shard, batch number, hour, kind (0 a transaction, -1 or 1
# a fraud verdict's change), terminal id length (then the id). Step 1's reads: time_ms,
# terminal id length. An outbox entry: batch number, hour, kind, terminal id length (then
# the id). Step 2's events: time_ms, amount. A label: its head as on one Redis.
_INCREMENT: Final = struct.Struct("<iqiii")
_READ: Final = struct.Struct("<qi")
_OUTBOX_ENTRY: Final = struct.Struct("<qiii")
_EVENT: Final = struct.Struct("<qd")
_LABEL: Final = struct.Struct("<q8s8sqc")
_LENGTH: Final = struct.Struct("<i")


def expired_from_reply(reply: Sequence[bytes]) -> list[ExpiredLabel]:
    """The labels ``expired_labels.lua`` handed out: (pending key, source) pairs."""
    labels = []
    for i in range(0, len(reply), 2):
        key = reply[i].decode(errors="replace")
        tx_id = key[key.index(":lp:") + len(":lp:") :]
        labels.append(ExpiredLabel(tx_id, reply[i + 1], key))
    return labels


class StateReplicationError(RedisError):
    """A state write did not reach the replicas required in time; the batch is retried."""


def shard_tags(kind: str, shards: int) -> tuple[str, ...]:
    """One hash tag per shard, shard ``k``'s slot in the ``k``-th of ``shards`` equal slot
    ranges, so shards spread evenly over primaries serving contiguous ranges.

    >>> tags = shard_tags("c", 4)
    >>> [key_slot(t.encode()) * 4 // 16384 for t in tags]
    [0, 1, 2, 3]
    """
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be within 1..{MAX_SHARDS}, got {shards}")
    tags = []
    for k in range(shards):
        n = 0
        while key_slot(f"{kind}{k}.{n}".encode()) * shards // REDIS_CLUSTER_HASH_SLOTS != k:
            n += 1
        tags.append(f"{kind}{k}.{n}")
    return tuple(tags)


def shard_of(identifier: bytes, shards: int) -> int:
    """The shard of a customer or terminal id (UTF-8)."""
    return zlib.crc32(identifier) % shards


@dataclass
class _Call:
    """One script call on one slot; ``writes`` when it may write (then it is fenced)."""

    sha: str
    keys: list[str]
    args: list[Any]
    writes: bool


@dataclass
class _Found:
    """What the customer steps of a micro-batch found besides histories."""

    quarantined: list[str] = field(default_factory=list)
    labels_applied: list[LabelOutcome] = field(default_factory=list)


@dataclass
class _Batch:
    """A micro-batch's ids encoded once, with their shards."""

    customers: list[bytes]
    terminals: list[bytes]
    customer_shards: list[int]
    terminal_shards: list[int]


class ClusterState:
    """The sharded state protocol (see the module docstring) for one worker process.

    Args:
        client: a ``redis.asyncio.cluster.RedisCluster`` with ``decode_responses=False``.
        prefix: key prefix of this deployment.
        header: the state header of the scripts (``RedisStateStore`` builds it).
        scripts: the script texts by name: ``cluster_customers``, ``cluster_terminals``,
            ``cluster_labels``, ``expired_labels``.
        shards: customer shards and terminal shards (each).
        ttl_ms: lifetime of a key after its last write.
        label_delay_days: the label delay the terminal windows are shifted by.
        wait_replicas: replicas ``WAIT`` asks for after each write; 0 to not wait.
        wait_timeout_ms: how long ``WAIT`` waits for them.
        label_wait_ms: how long a label for a transaction not seen yet waits for it.
        on_quarantine: given the corrupt keys a call set aside; returns their names.
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        prefix: str,
        header: list[Any],
        scripts: dict[str, str],
        shards: int,
        ttl_ms: int,
        label_delay_days: int,
        wait_replicas: int,
        wait_timeout_ms: int,
        label_wait_ms: int,
        on_quarantine: Callable[[Sequence[bytes]], tuple[str, ...]],
    ) -> None:
        self.client = client
        self.label_wait_ms = label_wait_ms
        self.on_quarantine = on_quarantine
        self.prefix = prefix
        self.shards = shards
        self.ttl_ms = ttl_ms
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        # Encoded once: the client would encode every number of every call.
        self._header = [str(value).encode() for value in header]
        self._n_counts = 2 * len(features.terminal_window_days(label_delay_days))
        # An event at hour H reads hours up to H - reach: one that many hours after the
        # earliest of a part could read what that part counts.
        self._reach = -max(hi for _, hi in features.terminal_window_hours(label_delay_days))
        self._scripts = scripts
        self._sha = {n: hashlib.sha1(s.encode()).hexdigest() for n, s in scripts.items()}
        self._loaded = False
        self._customer_tags = shard_tags("c", shards)
        self._terminal_tags = shard_tags("t", shards)
        # Per customer shard, the last batch number this process saw counted everywhere:
        # its outbox entries up to it are dropped by the next step 2 there.
        self._counted: dict[int, int] = {}

    # Keys ------------------------------------------------------------------------------

    def _customer_prefix(self, cshard: int) -> str:
        return f"{self.prefix}:{{{self._customer_tags[cshard]}}}:c:"

    def _terminal_prefix(self, tshard: int) -> str:
        return f"{self.prefix}:{{{self._terminal_tags[tshard]}}}:t2:"

    def customer_key(self, customer_id: str) -> str:
        """Key of a customer's history."""
        return self._customer_prefix(shard_of(customer_id.encode(), self.shards)) + customer_id

    def terminal_key(self, terminal_id: str) -> str:
        """Key of a terminal's day and hour counters."""
        return self._terminal_prefix(shard_of(terminal_id.encode(), self.shards)) + terminal_id

    def ledger_key(self, customer_id: str, transaction_id: str) -> str:
        """Key of a transaction's ledger entry (in its customer's shard)."""
        tag = self._customer_tags[shard_of(customer_id.encode(), self.shards)]
        return f"{self.prefix}:{{{tag}}}:x:{transaction_id}"

    def _shard_prefix(self, tag: str) -> str:
        return f"{self.prefix}:{{{tag}}}:"

    def _shard_key(self, tag: str, name: str) -> str:
        return f"{self.prefix}:{{{tag}}}:{name}"

    # Transactions ----------------------------------------------------------------------

    def parts(self, updates: Sequence[TransactionUpdate]) -> list[list[int]]:
        """Cut a micro-batch, in order, into parts in which no event's windows reach the
        hour of an earlier event of its part."""
        parts: list[list[int]] = []
        current: list[int] = []
        earliest = 0
        for i, update in enumerate(updates):
            hour = update.time_ms // features.MS_PER_HOUR
            if current and hour - self._reach >= earliest:
                parts.append(current)
                current = []
            earliest = hour if not current else min(earliest, hour)
            current.append(i)
        if current:
            parts.append(current)
        return parts

    def _encode(self, updates: Sequence[TransactionUpdate]) -> _Batch:
        customers = [u.customer_id.encode() for u in updates]
        terminals = [u.terminal_id.encode() for u in updates]
        n = self.shards
        return _Batch(
            customers,
            terminals,
            [zlib.crc32(c) % n for c in customers],
            [zlib.crc32(t) % n for t in terminals],
        )

    async def apply_transactions(self, updates: Sequence[TransactionUpdate]) -> BatchState:
        """Apply a micro-batch in order and return each event's retained history."""
        batch = self._encode(updates)
        stored: list[bytes] = [b""] * len(updates)
        new: list[bytes] = [b""] * len(updates)
        flags = bytearray(b"0" * len(updates))
        resets = bytearray(b"0" * len(updates))
        found = _Found()
        parts = self.parts(updates)
        counts = await self._terminal_step(updates, batch, {}, parts[0])
        for j, part in enumerate(parts):
            outboxes = await self._customer_step(
                updates, batch, part, counts, stored, new, flags, resets, found
            )
            increments, newest = self._increments(outboxes)
            following = parts[j + 1] if j + 1 < len(parts) else []
            counts = await self._terminal_step(updates, batch, increments, following)
            for shard, number in newest.items():
                self._counted[shard] = max(self._counted.get(shard, 0), number)
        lengths = (
            np.fromiter((len(s) + len(n) for s, n in zip(stored, new, strict=True)), np.int64)
            // ENTRY_DTYPE.itemsize
        )
        flat = np.frombuffer(
            b"".join(b for pair in zip(stored, new, strict=True) for b in pair), ENTRY_DTYPE
        )
        history = features.HistoryBatch(
            group=np.repeat(np.arange(len(updates), dtype=np.int64), lengths),
            times_ms=flat["time_ms"].astype(np.int64),
            amounts=flat["amount"].astype(np.float64),
            terminal_tx=flat["terminal_tx"].astype(np.int64),
            terminal_fraud=flat["terminal_fraud"].astype(np.int64),
        )
        outcome = np.frombuffer(flags, np.uint8)
        return BatchState(
            history=history,
            duplicate=outcome == ord("1"),
            conflict=outcome == ord("C"),
            reset=np.frombuffer(resets, np.uint8) == ord("1"),
            quarantined=tuple(found.quarantined),
            labels_applied=tuple(found.labels_applied),
        )

    async def _terminal_step(
        self,
        updates: Sequence[TransactionUpdate],
        batch: _Batch,
        increments: dict[int, bytearray],
        readers: Sequence[int],
    ) -> dict[int, bytes]:
        """Steps 3 and 1 in one call per terminal shard: count ``increments`` (per terminal
        shard, packed for the script), then read the window counts of the events
        ``readers``; returns each reader's packed counts."""
        reads: dict[int, bytearray] = defaultdict(bytearray)
        readers_of: dict[int, list[int]] = defaultdict(list)
        for i in readers:
            tshard = batch.terminal_shards[i]
            tid = batch.terminals[i]
            reads[tshard] += _READ.pack(updates[i].time_ms, len(tid))
            reads[tshard] += tid
            readers_of[tshard].append(i)
        order = list(increments.keys() | reads.keys())
        if not order:
            return {}
        replies = await self._run(
            [
                _Call(
                    self._sha["cluster_terminals"],
                    [self._shard_key(self._terminal_tags[t], "w")],
                    [
                        *self._header,
                        self._terminal_prefix(t),
                        bytes(increments.get(t, b"")),
                        bytes(reads.get(t, b"")),
                    ],
                    writes=t in increments,
                )
                for t in order
            ]
        )
        size = 4 * self._n_counts
        counts: dict[int, bytes] = {}
        for t, reply in zip(order, replies, strict=True):
            for k, i in enumerate(readers_of.get(t, ())):
                counts[i] = reply[k * size : (k + 1) * size]
        return counts

    async def _customer_step(
        self,
        updates: Sequence[TransactionUpdate],
        batch: _Batch,
        part: Sequence[int],
        counts: dict[int, bytes],
        stored: list[bytes],
        new: list[bytes],
        flags: bytearray,
        resets: bytearray,
        found: _Found,
    ) -> dict[int, bytes]:
        """Step 2, one call per customer shard; fills each event's history parts, outcome
        and reset flags, and ``found``; returns each shard's outbox."""
        members: dict[int, list[int]] = defaultdict(list)
        packed: dict[int, bytearray] = defaultdict(bytearray)
        for i in part:
            u = updates[i]
            cshard = batch.customer_shards[i]
            members[cshard].append(i)
            cid, tid = batch.customers[i], batch.terminals[i]
            txid = u.transaction_id.encode()
            packed[cshard] += b"".join(
                (
                    transaction_hash(u.transaction_id),
                    _EVENT.pack(u.time_ms, u.amount),
                    id_hash(u.customer_id),
                    id_hash(u.terminal_id),
                    counts[i],
                    _LENGTH.pack(len(cid)),
                    cid,
                    _LENGTH.pack(len(tid)),
                    tid,
                    _LENGTH.pack(len(txid)),
                    txid,
                )
            )
        order = list(members)
        calls = []
        for cshard in order:
            tag = self._customer_tags[cshard]
            calls.append(
                _Call(
                    self._sha["cluster_customers"],
                    [
                        self._shard_key(tag, "q"),
                        self._shard_key(tag, "b"),
                        self._shard_key(tag, "lpq"),
                    ],
                    [
                        *self._header,
                        self._shard_prefix(tag),
                        bytes(packed[cshard]),
                        self._counted.get(cshard, 0),
                    ],
                    writes=True,
                )
            )
        replies = await self._run(calls)
        outboxes: dict[int, bytes] = {}
        for cshard, reply in zip(order, replies, strict=True):
            marks: bytes = reply[0]
            for k, i in enumerate(members[cshard]):
                flags[i] = marks[k]
                resets[i] = reply[1][k]
                stored[i] = reply[4 + 2 * k]
                new[i] = reply[5 + 2 * k]
            found.quarantined += self.on_quarantine(reply[2])
            found.labels_applied += [LABEL_CODES[chr(c)] for c in reply[3]]
            outboxes[cshard] = reply[-1]
        return outboxes

    def _increments(
        self, outboxes: dict[int, bytes]
    ) -> tuple[dict[int, bytearray], dict[int, int]]:
        """The outboxes' entries packed for step 3 by terminal shard, and each customer
        shard's newest batch number."""
        increments: dict[int, bytearray] = defaultdict(bytearray)
        newest: dict[int, int] = {}
        for cshard, outbox in outboxes.items():
            at = 0
            while at < len(outbox):
                number, hour, kind, length = _OUTBOX_ENTRY.unpack_from(outbox, at)
                at += _OUTBOX_ENTRY.size
                tid = outbox[at : at + length]
                at += length
                packed = increments[zlib.crc32(tid) % self.shards]
                packed += _INCREMENT.pack(cshard, number, hour, kind, length)
                packed += tid
                newest[cshard] = number
        return increments, newest

    # Labels ----------------------------------------------------------------------------

    async def apply_labels(self, labels: Sequence[LabelUpdate]) -> list[LabelOutcome]:
        """Reconcile labels with the ledger, one call per customer shard (the ledger lives
        with the transaction's customer), then count the verdicts' changes at their
        terminal shards through the outbox, as step 3 counts transactions: a worker dying
        in between leaves them in the outbox, and the next call on the shard sends them."""
        outcomes, outboxes = await self.label_step(labels)
        await self.count_outboxes(outboxes)
        return outcomes

    async def label_step(
        self, labels: Sequence[LabelUpdate]
    ) -> tuple[list[LabelOutcome], dict[int, bytes]]:
        """The customer-shard half of :meth:`apply_labels`: outcomes, and the outboxes."""
        members: dict[int, list[int]] = defaultdict(list)
        packed: dict[int, bytearray] = defaultdict(bytearray)
        for i, label in enumerate(labels):
            cshard = shard_of(label.customer_id.encode(), self.shards)
            members[cshard].append(i)
            txid, tid = label.transaction_id.encode(), label.terminal_id.encode()
            packed[cshard] += b"".join(
                (
                    _LABEL.pack(
                        label.time_ms,
                        id_hash(label.customer_id),
                        id_hash(label.terminal_id),
                        label.reported_ms,
                        b"1" if label.is_fraud else b"0",
                    ),
                    _LENGTH.pack(len(txid)),
                    txid,
                    _LENGTH.pack(len(tid)),
                    tid,
                    _LENGTH.pack(len(label.source)),
                    label.source,
                )
            )
        order = list(members)
        now_ms = int(time.time() * 1000)
        calls = []
        for cshard in order:
            tag = self._customer_tags[cshard]
            calls.append(
                _Call(
                    self._sha["cluster_labels"],
                    [
                        self._shard_key(tag, "q"),
                        self._shard_key(tag, "b"),
                        self._shard_key(tag, "lpq"),
                    ],
                    [
                        self.ttl_ms,
                        now_ms,
                        self.label_wait_ms,
                        self._shard_prefix(tag),
                        self._counted.get(cshard, 0),
                        bytes(packed[cshard]),
                    ],
                    writes=True,
                )
            )
        replies = await self._run(calls)
        outcomes = [LabelOutcome.DUPLICATE] * len(labels)
        outboxes: dict[int, bytes] = {}
        for cshard, reply in zip(order, replies, strict=True):
            for i, code in zip(members[cshard], reply[0], strict=True):
                outcomes[i] = LABEL_CODES[chr(code)]
            self.on_quarantine(reply[1])
            outboxes[cshard] = reply[2]
        return outcomes, outboxes

    async def count_outboxes(self, outboxes: dict[int, bytes]) -> None:
        """Step 3 alone: count the outboxes' entries at their terminal shards."""
        increments, newest = self._increments(outboxes)
        if increments:
            await self._terminal_step([], _Batch([], [], [], []), increments, [])
        for shard, number in newest.items():
            self._counted[shard] = max(self._counted.get(shard, 0), number)

    async def expired_labels(self, now_ms: int, lease_ms: int, limit: int) -> list[ExpiredLabel]:
        """Pending labels past their deadline on every customer shard, claimed for
        ``lease_ms``."""
        replies = await self._run(
            [
                _Call(
                    self._sha["expired_labels"],
                    [self._shard_key(tag, "lpq")],
                    [now_ms, lease_ms, limit],
                    writes=True,
                )
                for tag in self._customer_tags
            ]
        )
        return [label for reply in replies for label in expired_from_reply(reply)][:limit]

    # Calls -----------------------------------------------------------------------------

    async def _load_scripts(self) -> None:
        await self.client.initialize()
        for text in self._scripts.values():
            await self.client.script_load(text)  # on every primary
        self._loaded = True

    async def _run(self, calls: list[_Call]) -> list[Any]:
        """Run the calls in one pipeline (each node's share in order on one connection, the
        nodes in parallel), each node written to fenced by a write and ``WAIT``.

        Raises:
            StateReplicationError: a primary's replicas did not confirm in time.
            redis.exceptions.RedisError: any other failure; the cluster's layout is read
                again before it is raised, so a retry reaches the new primaries.
        """
        if not calls:
            return []
        if not self._loaded:
            await self._load_scripts()
        try:
            try:
                replies = await self._pipeline(calls)
            except NoScriptError:
                # A replica promoted since the scripts were loaded does not have them.
                await self._load_scripts()
                replies = await self._pipeline(calls)
        except RedisClusterException as exc:  # not a RedisError: make it retriable
            await self._refresh()
            raise RedisError(f"Redis Cluster: {exc}") from exc
        except StateReplicationError:
            raise
        except RedisError:
            await self._refresh()
            raise
        return replies

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        pipe = self.client.pipeline()
        fences: dict[str, tuple[ClusterNode, str]] = {}
        for call in calls:
            pipe.execute_command("EVALSHA", call.sha, len(call.keys), *call.keys, *call.args)
            if call.writes and self.wait_replicas > 0:
                node = self.client.get_node_from_key(call.keys[0])
                if node is not None and node.name not in fences:
                    # The fence shares the call's hash tag, hence its node.
                    tag = call.keys[0].split("{", 1)[1].split("}", 1)[0]
                    fences[node.name] = (node, self._shard_key(tag, "f"))
        for node, key in fences.values():
            pipe.execute_command("SET", key, b"", "PX", self.ttl_ms)
            pipe.execute_command(
                "WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node
            )
        replies = await pipe.execute(raise_on_error=True, allow_redirections=False)
        for k, (node, _) in enumerate(fences.values()):
            confirmed = int(replies[len(calls) + 2 * k + 1])
            if confirmed < self.wait_replicas:
                raise StateReplicationError(
                    f"Redis Cluster primary {node.name}: state writes reached {confirmed} of "
                    f"{self.wait_replicas} replicas in {self.wait_timeout_ms} ms; retrying "
                    "(FRAUDSTREAM_REDIS_CLUSTER_WAIT_REPLICAS sets how many are required)"
                )
        return replies[: len(calls)]

    async def _refresh(self) -> None:
        """Read the cluster's layout again (a failover moves slots to a new primary)."""
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self.client.nodes_manager.initialize()
