"""Customer and terminal state: what the online feature path reads, kept in Redis.

State per customer is its retained recent transactions (:data:`ENTRY_DTYPE` records, arrival
order), each carrying the terminal's window counters as they stood when it was scored, so a
redelivered event finds exactly the inputs it was first scored with. State per terminal is
per-hour transaction and fraud counters; fraud counters grow as labels arrive.

One micro-batch is one call, applied event by event in order:

1. every transaction is entered in a **ledger** by its id, with what it was: customer,
   terminal, time and amount. An id already in the ledger with the same content is a
   redelivery: nothing changes and the history up to and including it is returned, so it
   yields the same score. An id already there with other content (another amount, time,
   terminal or customer) is a **conflicting duplicate**: nothing changes and the event is
   refused (the worker dead-letters it), never scored as its first occurrence;
2. otherwise the terminal's window counters (:func:`features.terminal_window_hours`)
   are read, the transaction is appended to its customer's history with them, the terminal's
   counter for its hour is incremented, and history no longer needed is dropped: a customer
   keeps its last ``T`` transactions and everything within the widest customer window
   (30 days) before the oldest of them, at most ``T - 1 + K`` transactions in all (a
   customer window counts at most ``K``, :data:`features.MAX_CUSTOMER_WINDOW_TX`).

Labels are reconciled with the ledger: a label counts only for a transaction entered there
with the label's customer, terminal and time (otherwise it is refused, ``mismatch``). The
ledger keeps each transaction's latest verdict (by ``reported_at``), and a terminal's fraud
counters follow it: a fraud verdict adds one to the hour of the transaction, a later
"genuine" correction takes it back, a verdict older than the one kept is ignored, all in the
same atomic step as the verdict itself. A label for a transaction not in the ledger yet is
kept **pending** for a bounded time (``label_wait_s``): the transaction's arrival applies it;
past its deadline :meth:`StateStore.expired_labels` hands it back to be dead-lettered. A
terminal's fraud counter is never above its transaction counter in any hour.

Stored state that is not what the store writes (a key of another type or size) is
**quarantined**: renamed aside, reported, and the events it concerns are scored from empty
state with ``reset`` set, so one corrupt key cannot stop the worker.

:class:`stream_app.state.redis.RedisStateStore` implements them in one Lua script call per
micro-batch on one Redis, and on a Redis Cluster in per-slot calls whose split keeps these
semantics through a crash between them (:mod:`stream_app.state.redis_cluster`). The tests
hold both to a plain-Python reference implementation (``tests/memory_state.py``).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
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


# How long a label for a transaction not seen yet waits for it before it is refused.
DEFAULT_LABEL_WAIT_S: Final = 3600.0


def transaction_hash(transaction_id: str) -> bytes:
    """8-byte digest of a transaction id: the dedupe key inside a customer's history."""
    return id_hash(transaction_id)


def id_hash(identifier: str) -> bytes:
    """8-byte digest of an identifier, as the ledger compares customers and terminals."""
    return hashlib.blake2b(identifier.encode(), digest_size=8).digest()


class LabelOutcome(enum.StrEnum):
    """What a label did to the state; the values label the labels metric."""

    FRAUD = "fraud"  # a first verdict, fraud: counted in its terminal's hour
    GENUINE = "genuine"  # a first verdict, genuine: no counter changes
    CORRECTED = "corrected"  # a newer verdict that differs: the counters follow it
    DUPLICATE = "duplicate"  # the verdict already kept
    STALE = "stale"  # older than the verdict kept: ignored
    PENDING = "pending"  # its transaction is not in the ledger yet: waits for it
    MISMATCH = "mismatch"  # its transaction has another customer, terminal or time


# One-letter codes the Lua scripts return per label.
LABEL_CODES: Final = {
    "F": LabelOutcome.FRAUD,
    "G": LabelOutcome.GENUINE,
    "R": LabelOutcome.CORRECTED,
    "D": LabelOutcome.DUPLICATE,
    "S": LabelOutcome.STALE,
    "P": LabelOutcome.PENDING,
    "M": LabelOutcome.MISMATCH,
}


class TransactionUpdate(NamedTuple):
    """What the state needs of one valid transaction."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    time_ms: int
    amount: float


class LabelUpdate(NamedTuple):
    """What the state needs of one label; ``source`` is kept, opaque, while it is pending."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    time_ms: int
    is_fraud: bool
    reported_ms: int = 0
    source: bytes = b""


class ExpiredLabel(NamedTuple):
    """A pending label whose transaction never came: its ``source``, to dead-letter, and
    where the store keeps it (``key``, for :meth:`StateStore.drop_pending`)."""

    transaction_id: str
    source: bytes
    key: str = ""


@dataclass(frozen=True)
class BatchState:
    """Result of applying a micro-batch: each event's history and what happened to it.

    ``conflict`` events (an id already used for another transaction) changed nothing and
    must not be scored: their history is a placeholder. ``reset`` events were scored from
    empty state because their stored state was corrupt (see ``quarantined``, the keys set
    aside). ``labels_applied``: what the pending labels the batch's transactions settled did.
    """

    history: features.HistoryBatch
    duplicate: npt.NDArray[np.bool_]
    conflict: npt.NDArray[np.bool_] | None = None
    reset: npt.NDArray[np.bool_] | None = None
    quarantined: tuple[str, ...] = ()
    labels_applied: tuple[LabelOutcome, ...] = ()

    @property
    def conflicts(self) -> npt.NDArray[np.bool_]:
        """``conflict``, all false when the store reported none."""
        if self.conflict is None:
            return np.zeros(len(self.duplicate), dtype=bool)
        return self.conflict

    @property
    def resets(self) -> npt.NDArray[np.bool_]:
        """``reset``, all false when the store reported none."""
        if self.reset is None:
            return np.zeros(len(self.duplicate), dtype=bool)
        return self.reset


class StateStore(Protocol):
    """Customer and terminal state behind the online features."""

    async def apply_transactions(self, updates: Sequence[TransactionUpdate]) -> BatchState:
        """Apply a micro-batch in order and return each event's retained history."""
        ...

    async def apply_labels(self, labels: Sequence[LabelUpdate]) -> list[LabelOutcome]:
        """Reconcile labels with the ledger and apply their verdicts; one outcome each."""
        ...

    async def expired_labels(self, limit: int) -> list[ExpiredLabel]:
        """Pending labels past their deadline, claimed for a while (a crash before
        :meth:`drop_pending` hands them out again)."""
        ...

    async def drop_pending(self, expired: Sequence[ExpiredLabel]) -> None:
        """Forget pending labels (once dead-lettered), with every label waiting for the
        same transaction."""
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


def max_history(sequence_length: int) -> int:
    """Most entries a sequence's features read: its ``T`` rows and ``K - 1`` before the oldest.

    ``K`` is :data:`features.MAX_CUSTOMER_WINDOW_TX`, the most rows a customer window
    counts. A customer's stored history never exceeds this plus ``TRIM_SLACK - 1`` entries.

    >>> max_history(5) == 4 + features.MAX_CUSTOMER_WINDOW_TX
    True
    """
    return sequence_length - 1 + features.MAX_CUSTOMER_WINDOW_TX


def retained(entries: npt.NDArray[np.void], sequence_length: int) -> npt.NDArray[np.void]:
    """Drop history no sequence element needs: of the last :func:`max_history` entries, keep
    those from 30 days before the oldest of the last ``T`` on.

    The leading entries outside that go, but only once there are :data:`TRIM_SLACK` of them
    (until then they sit outside every window, harmlessly), so the history holds at most
    ``max_history(T) + TRIM_SLACK - 1`` entries whatever the customer does: a burst of one
    card costs a bounded key and bounded work per event. The Lua twin is ``append_record``
    in ``redis_scripts/customer_history.lua``.
    """
    if len(entries) <= sequence_length:
        return entries
    cutoff = int(entries["time_ms"][-sequence_length]) - features.CUSTOMER_LOOKBACK_MS
    # The leading run at or before the cutoff ends by entry -T, which is newer.
    by_time = int(np.argmax(entries["time_ms"] > cutoff))
    by_count = len(entries) - max_history(sequence_length)
    droppable = max(by_time, by_count)
    return entries[droppable:] if droppable >= TRIM_SLACK else entries


class LedgerEntry(NamedTuple):
    """What the ledger keeps of a transaction: its content and its latest verdict."""

    customer_id: str
    terminal_id: str
    time_ms: int
    amount: float
    verdict: bool | None = None
    reported_ms: int = 0

    def same_transaction(self, update: TransactionUpdate) -> bool:
        """Whether ``update`` is this transaction again (a redelivery), not a reused id."""
        return (self.customer_id, self.terminal_id, self.time_ms, self.amount) == (
            update.customer_id,
            update.terminal_id,
            update.time_ms,
            update.amount,
        )

    def matches(self, label: LabelUpdate) -> bool:
        """Whether ``label`` names this transaction's customer, terminal and time."""
        return (self.customer_id, self.terminal_id, self.time_ms) == (
            label.customer_id,
            label.terminal_id,
            label.time_ms,
        )
