"""Shared cases for the online == offline checks: random histories, replayed like the worker."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from stream_app import features as F
from stream_app.state.store import LabelUpdate, StateStore, TransactionUpdate

BASE_MS = 1_522_540_800_000  # 2018-04-01T00:00:00Z, a Sunday


@dataclass(frozen=True)
class Tx:
    customer: int
    terminal: int
    time_ms: int
    amount: float
    fraud: bool
    label_delay_ms: int


def _time_offsets() -> st.SearchStrategy[int]:
    # Mix fine-grained times with round ones so exact window boundaries get hit.
    return st.one_of(
        st.integers(0, 60 * F.MS_PER_DAY),
        st.integers(0, 60 * 24).map(lambda h: h * F.MS_PER_HOUR),
        st.integers(0, 60).map(lambda d: d * F.MS_PER_DAY),
    )


transactions = st.lists(
    st.builds(
        Tx,
        customer=st.integers(0, 3),
        terminal=st.integers(0, 3),
        time_ms=_time_offsets().map(lambda o: BASE_MS + o),
        amount=st.one_of(
            st.just(0.0),
            st.integers(0, 500_000).map(lambda m: m / 1000),
            st.floats(0, 5000, allow_nan=False),
        ),
        fraud=st.booleans(),
        label_delay_ms=st.integers(0, F.LABEL_DELAY_DAYS * F.MS_PER_DAY),
    ),
    min_size=1,
    max_size=60,
)


@st.composite
def bursts(draw: st.DrawFn) -> list[Tx]:
    """A card-testing burst: one customer's history well past the window bound, in minutes.

    ``K + 1`` to ``2 K + 40`` transactions (``K`` = ``F.MAX_CUSTOMER_WINDOW_TX``) seconds
    apart, some at the same millisecond, mixed into random background history in which the
    same customer may already have older transactions, so both the count bound and the 30-day
    cutoff trim the same history.
    """
    background = draw(transactions)
    n = draw(st.integers(F.MAX_CUSTOMER_WINDOW_TX + 1, 2 * F.MAX_CUSTOMER_WINDOW_TX + 40))
    customer = draw(st.integers(0, 4))
    start = BASE_MS + draw(st.integers(0, 60 * F.MS_PER_DAY))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    gaps = rng.integers(0, 3_000, n) * (rng.random(n) < 0.9)  # 10 % at the same ms
    times = start + np.cumsum(gaps)
    amounts = np.round(rng.uniform(0, 20, n), 2)
    burst = [
        Tx(customer, int(rng.integers(0, 4)), int(t), float(a), bool(rng.random() < 0.5), 0)
        for t, a in zip(times, amounts, strict=True)
    ]
    return background + burst


async def replay_online(
    store: StateStore, txs: list[Tx], batch_sizes: list[int], sequence_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Replay by time like the worker: labels as they arrive, transactions in micro-batches.

    A batch is cut before any transaction that a pending label arrives ahead of, as the
    worker's label consumer would have applied it by then.
    """
    order = sorted(range(len(txs)), key=lambda i: (txs[i].time_ms, i))
    labels = sorted((txs[i].time_ms + txs[i].label_delay_ms, i) for i in range(len(txs)))
    feats = np.zeros((len(txs), F.N_FEATURES))
    seqs = np.zeros((len(txs), sequence_length, F.N_FEATURES))
    next_label = 0
    pos = 0
    size_iter = iter(batch_sizes * (len(txs) + 1))

    while pos < len(order):
        first_time = txs[order[pos]].time_ms
        due: list[LabelUpdate] = []
        while next_label < len(labels) and labels[next_label][0] < first_time:
            i = labels[next_label][1]
            due.append(
                LabelUpdate(
                    str(i),
                    str(txs[i].customer),
                    str(txs[i].terminal),
                    txs[i].time_ms,
                    txs[i].fraud,
                )
            )
            next_label += 1
        await store.apply_labels(due)
        limit = next(size_iter)
        batch = [order[pos]]
        while len(batch) < limit and pos + len(batch) < len(order):
            candidate = order[pos + len(batch)]
            if next_label < len(labels) and labels[next_label][0] < txs[candidate].time_ms:
                break
            batch.append(candidate)
        updates = [
            TransactionUpdate(
                str(i),
                str(txs[i].customer),
                str(txs[i].terminal),
                txs[i].time_ms,
                txs[i].amount,
            )
            for i in batch
        ]
        state = await store.apply_transactions(updates)
        assert not state.duplicate.any()
        f, s = F.online_features(state.history, sequence_length)
        feats[batch] = f
        seqs[batch] = s
        # Redelivering the batch's last event changes nothing and gives the same inputs.
        again = await store.apply_transactions(updates[-1:])
        assert again.duplicate.tolist() == [True]
        f2, s2 = F.online_features(again.history, sequence_length)
        np.testing.assert_array_equal(f2[0], f[-1])
        np.testing.assert_array_equal(s2[0], s[-1])
        pos += len(batch)

    return feats, seqs


def run_offline(txs: list[Tx], sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    off = F.offline_features(
        np.array([t.customer for t in txs]),
        np.array([t.terminal for t in txs]),
        np.array([t.time_ms for t in txs], dtype=np.int64),
        np.array([t.amount for t in txs]),
        np.array([t.fraud for t in txs]),
    )
    seqs = off.sequences(sequence_length, off.position, dtype=np.float64)
    return off.in_input_order(), seqs
