"""The state semantics in plain Python: the reference the Redis stores are tested against.

Test support, not production code: :class:`MemoryStateStore` implements
:class:`stream_app.state.store.StateStore` with dictionaries, one event at a time, so the
property tests can hold the Lua scripts (one Redis and a Redis Cluster) to it batch for
batch, and the feature tests can compare online and offline features through it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stream_app import features
from stream_app.state.store import (
    DEFAULT_LABEL_WAIT_S,
    ENTRY_DTYPE,
    BatchState,
    ExpiredLabel,
    LabelOutcome,
    LabelUpdate,
    LedgerEntry,
    TransactionUpdate,
    history_from_records,
    retained,
    transaction_hash,
)


@dataclass
class MemoryStateStore:
    """In-process state store: the reference semantics, for tests and offline use."""

    sequence_length: int = features.DEFAULT_SEQUENCE_LENGTH
    label_delay_days: int = features.LABEL_DELAY_DAYS
    label_wait_s: float = DEFAULT_LABEL_WAIT_S
    clock: Callable[[], float] = time.time
    customers: dict[str, npt.NDArray[np.void]] = field(default_factory=dict)
    terminal_tx: defaultdict[str, defaultdict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    terminal_fraud: defaultdict[str, defaultdict[int, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    ledger: dict[str, LedgerEntry] = field(default_factory=dict)
    # Labels waiting for their transaction: per transaction id, the latest label naming
    # each (time, customer, terminal), and the wall-clock deadline (ms) of the id.
    pending: dict[str, dict[tuple[int, str, str], LabelUpdate]] = field(default_factory=dict)
    deadlines: dict[str, int] = field(default_factory=dict)

    def _window_counts(self, terminal_id: str, hour: int) -> tuple[list[int], list[int]]:
        windows = features.terminal_window_hours(self.label_delay_days)
        sums = [
            [sum(counts.get(hour + k, 0) for k in range(lo, hi + 1)) for lo, hi in windows]
            for counts in (self.terminal_tx[terminal_id], self.terminal_fraud[terminal_id])
        ]
        return sums[0], sums[1]

    def _entry(self, update: TransactionUpdate, digest: bytes) -> npt.NDArray[np.void]:
        hour = update.time_ms // features.MS_PER_HOUR
        tx_sums, fraud_sums = self._window_counts(update.terminal_id, hour)
        return np.array(
            [(update.time_ms, update.amount, digest, tx_sums, fraud_sums)], dtype=ENTRY_DTYPE
        )

    async def apply_transactions(self, updates: Sequence[TransactionUpdate]) -> BatchState:
        """Apply a micro-batch in order and return each event's retained history."""
        records: list[npt.NDArray[np.void]] = []
        duplicate = np.zeros(len(updates), dtype=bool)
        conflict = np.zeros(len(updates), dtype=bool)
        applied: list[LabelOutcome] = []
        for i, update in enumerate(updates):
            entries = self.customers.get(update.customer_id, np.zeros(0, dtype=ENTRY_DTYPE))
            digest = transaction_hash(update.transaction_id)
            known = self.ledger.get(update.transaction_id)
            if known is not None and not known.same_transaction(update):
                conflict[i] = True  # a placeholder history: the event is not scored
                records.append(self._entry(update, digest))
                continue
            seen = np.flatnonzero(entries["tx_hash"] == digest)
            if known is not None:
                duplicate[i] = True
                # A redelivery older than the history kept: today's inputs, nothing stored.
                history = entries[: seen[0] + 1] if len(seen) else entries
                records.append(
                    history.copy()
                    if len(seen)
                    else np.concatenate([history, self._entry(update, digest)])
                )
                continue
            if len(seen):  # in a history written before the ledger: same time and amount?
                first = entries[seen[0]]
                same = (int(first["time_ms"]), float(first["amount"])) == (
                    update.time_ms,
                    update.amount,
                )
                duplicate[i], conflict[i] = same, not same
                records.append(entries[: seen[0] + 1].copy())
                continue
            entries = retained(
                np.concatenate([entries, self._entry(update, digest)]), self.sequence_length
            )
            self.customers[update.customer_id] = entries
            hour = update.time_ms // features.MS_PER_HOUR
            self.terminal_tx[update.terminal_id][hour] += 1
            self.ledger[update.transaction_id] = LedgerEntry(
                update.customer_id, update.terminal_id, update.time_ms, update.amount
            )
            records.append(entries.copy())
            waiting = self.pending.get(update.transaction_id, {})
            label = waiting.pop((update.time_ms, update.customer_id, update.terminal_id), None)
            if label is not None:
                applied.append(self._apply_verdict(label))
                if not waiting:
                    self.pending.pop(update.transaction_id)
                    self.deadlines.pop(update.transaction_id)
        return BatchState(
            history=history_from_records(records),
            duplicate=duplicate,
            conflict=conflict,
            labels_applied=tuple(applied),
        )

    def _apply_verdict(self, label: LabelUpdate) -> LabelOutcome:
        known = self.ledger[label.transaction_id]
        if known.verdict is not None and known.reported_ms > label.reported_ms:
            return LabelOutcome.STALE
        if known.verdict is label.is_fraud:
            return LabelOutcome.DUPLICATE
        delta = int(label.is_fraud) - int(known.verdict is True)
        if delta:
            hour = known.time_ms // features.MS_PER_HOUR
            counts = self.terminal_fraud[known.terminal_id]
            ceiling = self.terminal_tx[known.terminal_id].get(hour, 0)
            counts[hour] = min(max(counts.get(hour, 0) + delta, 0), ceiling)
        self.ledger[label.transaction_id] = known._replace(
            verdict=label.is_fraud, reported_ms=label.reported_ms
        )
        if known.verdict is not None:
            return LabelOutcome.CORRECTED
        return LabelOutcome.FRAUD if label.is_fraud else LabelOutcome.GENUINE

    async def apply_labels(self, labels: Sequence[LabelUpdate]) -> list[LabelOutcome]:
        """Reconcile labels with the ledger and apply their verdicts; one outcome each."""
        outcomes: list[LabelOutcome] = []
        now_ms = int(self.clock() * 1000)
        for label in labels:
            known = self.ledger.get(label.transaction_id)
            if known is None:
                waiting = self.pending.setdefault(label.transaction_id, {})
                names = (label.time_ms, label.customer_id, label.terminal_id)
                if names not in waiting or waiting[names].reported_ms <= label.reported_ms:
                    waiting[names] = label
                self.deadlines[label.transaction_id] = now_ms + int(self.label_wait_s * 1000)
                outcomes.append(LabelOutcome.PENDING)
            elif not known.matches(label):
                outcomes.append(LabelOutcome.MISMATCH)
            else:
                outcomes.append(self._apply_verdict(label))
        return outcomes

    async def expired_labels(self, limit: int) -> list[ExpiredLabel]:
        """Pending labels past their deadline, claimed for ``label_wait_s`` more."""
        now_ms = int(self.clock() * 1000)
        due = [t for t, deadline in self.deadlines.items() if deadline <= now_ms][:limit]
        for tx_id in due:
            self.deadlines[tx_id] = now_ms + int(self.label_wait_s * 1000)
        return [ExpiredLabel(t, label.source) for t in due for label in self.pending[t].values()]

    async def drop_pending(self, expired: Sequence[ExpiredLabel]) -> None:
        """Forget pending labels (once dead-lettered)."""
        for label in expired:
            self.pending.pop(label.transaction_id, None)
            self.deadlines.pop(label.transaction_id, None)
