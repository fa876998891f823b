"""Customer and terminal state: what the online feature path reads, kept in Redis.

State per customer is its retained recent transactions (:data:`ENTRY_DTYPE` records, arrival
order), each carrying the terminal's window counters as they stood when it was scored, so a
redelivered event finds exactly the inputs it was first scored with. State per terminal is
per-hour transaction and fraud counters; fraud counters grow as labels arrive.

One micro-batch is one call, applied event by event in order:

1. a transaction already in its customer's history is a duplicate: nothing changes and the
   history up to and including it is returned, so it yields the same score;
2. otherwise the terminal's window counters (:func:`features.terminal_window_hours`)
   are read, the transaction is appended to its customer's history with them, the terminal's
   counter for its hour is incremented, and history no longer needed is dropped: a customer
   keeps its last ``T`` transactions and everything within the widest customer window
   (30 days) before the oldest of them.

:class:`MemoryStateStore` is the reference implementation; :class:`stream_app.redis_state.
RedisStateStore` does the same in one Lua script call per micro-batch on one Redis, and on a
Redis Cluster in per-slot calls whose split keeps these semantics through a crash between
them (:mod:`stream_app.redis_cluster_state`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from stream_app import features

# One retained transaction, as stored in Redis (48 bytes, little-endian).
ENTRY_DTYPE: Final = np.dtype(
    [
        ("time_ms", "<i8"),
        ("amount", "<f8"),
        ("tx_hash", "S8"),
        ("terminal_tx", "<i4", (features.N_TERMINAL_WINDOWS,)),
        ("terminal_fraud", "<i4", (features.N_TERMINAL_WINDOWS,)),
    ]
)
ENTRY_SIZE: Final = ENTRY_DTYPE.itemsize
# History a customer may carry past what it needs before it is rewritten without it: the
# droppable entries are outside every window, so keeping a few saves rewriting the key on
# almost every event (Redis then only appends).
TRIM_SLACK: Final = 8
# Days of terminal counters Redis keeps (a ring): the windows read 30 days ending 7 days
# back, so events and labels up to 26 days late still find their day.
TERMINAL_RING_DAYS: Final = 64


def transaction_hash(transaction_id: str) -> bytes:
    """8-byte digest of a transaction id: the dedupe key inside a customer's history."""
    return hashlib.blake2b(transaction_id.encode(), digest_size=8).digest()


class TransactionUpdate(NamedTuple):
    """What the state needs of one valid transaction."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    time_ms: int
    amount: float


class LabelUpdate(NamedTuple):
    """What the state needs of one label: the fraud counter of the terminal's hour."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    time_ms: int
    is_fraud: bool


@dataclass(frozen=True)
class BatchState:
    """Result of applying a micro-batch: each event's history, and which were duplicates."""

    history: features.HistoryBatch
    duplicate: npt.NDArray[np.bool_]


class StateStore(Protocol):
    """Customer and terminal state behind the online features."""

    async def apply_transactions(self, updates: Sequence[TransactionUpdate]) -> BatchState:
        """Apply a micro-batch in order and return each event's retained history."""
        ...

    async def apply_labels(self, labels: Sequence[LabelUpdate]) -> int:
        """Count fraud labels into their terminal's hour; returns how many were new frauds."""
        ...


def history_from_records(records: Sequence[npt.NDArray[np.void]]) -> features.HistoryBatch:
    """Flatten per-event arrays of :data:`ENTRY_DTYPE` into a :class:`features.HistoryBatch`."""
    lengths = np.fromiter((len(r) for r in records), dtype=np.int64, count=len(records))
    flat = np.concatenate(records) if records else np.zeros(0, dtype=ENTRY_DTYPE)
    return features.HistoryBatch(
        group=np.repeat(np.arange(len(records), dtype=np.int64), lengths),
        times_ms=flat["time_ms"].astype(np.int64),
        amounts=flat["amount"].astype(np.float64),
        terminal_tx=flat["terminal_tx"].astype(np.int64),
        terminal_fraud=flat["terminal_fraud"].astype(np.int64),
    )


def retained(entries: npt.NDArray[np.void], sequence_length: int) -> npt.NDArray[np.void]:
    """Drop history no sequence element needs: keep the last ``T`` and 30 days before them.

    The leading entries at or before the cutoff go, but only once there are
    :data:`TRIM_SLACK` of them (until then they sit outside every window, harmlessly).
    """
    if len(entries) <= sequence_length:
        return entries
    cutoff = int(entries["time_ms"][-sequence_length]) - features.CUSTOMER_LOOKBACK_MS
    # The leading run at or before the cutoff ends by entry -T, which is newer.
    droppable = int(np.argmax(entries["time_ms"] > cutoff))
    return entries[droppable:] if droppable >= TRIM_SLACK else entries


@dataclass
class MemoryStateStore:
    """In-process state store: the reference semantics, for tests and offline use."""

    sequence_length: int = features.DEFAULT_SEQUENCE_LENGTH
    label_delay_days: int = features.LABEL_DELAY_DAYS
    customers: dict[str, npt.NDArray[np.void]] = field(default_factory=dict)
    terminal_tx: defaultdict[str, defaultdict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    terminal_fraud: defaultdict[str, defaultdict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    labelled: set[str] = field(default_factory=set)

    def _window_counts(self, terminal_id: str, hour: int) -> tuple[list[int], list[int]]:
        windows = features.terminal_window_hours(self.label_delay_days)
        sums = [
            [sum(counts.get(hour + k, 0) for k in range(lo, hi + 1)) for lo, hi in windows]
            for counts in (self.terminal_tx[terminal_id], self.terminal_fraud[terminal_id])
        ]
        return sums[0], sums[1]

    async def apply_transactions(self, updates: Sequence[TransactionUpdate]) -> BatchState:
        """Apply a micro-batch in order and return each event's retained history."""
        records: list[npt.NDArray[np.void]] = []
        duplicate = np.zeros(len(updates), dtype=bool)
        for i, update in enumerate(updates):
            entries = self.customers.get(update.customer_id, np.zeros(0, dtype=ENTRY_DTYPE))
            digest = transaction_hash(update.transaction_id)
            seen = np.flatnonzero(entries["tx_hash"] == digest)
            if len(seen):
                duplicate[i] = True
                records.append(entries[: seen[0] + 1].copy())
                continue
            hour = update.time_ms // features.MS_PER_HOUR
            tx_sums, fraud_sums = self._window_counts(update.terminal_id, hour)
            entry = np.array(
                [(update.time_ms, update.amount, digest, tx_sums, fraud_sums)], dtype=ENTRY_DTYPE
            )
            entries = retained(np.concatenate([entries, entry]), self.sequence_length)
            self.customers[update.customer_id] = entries
            self.terminal_tx[update.terminal_id][hour] += 1
            records.append(entries.copy())
        return BatchState(history=history_from_records(records), duplicate=duplicate)

    async def apply_labels(self, labels: Sequence[LabelUpdate]) -> int:
        """Count fraud labels into their terminal's hour; a label seen before counts once."""
        new_frauds = 0
        for label in labels:
            if label.transaction_id in self.labelled:
                continue
            self.labelled.add(label.transaction_id)
            if label.is_fraud:
                hour = label.time_ms // features.MS_PER_HOUR
                self.terminal_fraud[label.terminal_id][hour] += 1
                new_frauds += 1
        return new_frauds
