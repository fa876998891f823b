"""The feature definitions: online (state store) equals offline (whole file) to 1e-6."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_app import features as F
from stream_app.state import LabelUpdate, MemoryStateStore, StateStore, TransactionUpdate

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


def run_online(
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

    async def replay() -> None:
        nonlocal next_label, pos
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

    asyncio.run(replay())
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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    txs=transactions,
    batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    sequence_length=st.integers(1, 6),
)
def test_online_equals_offline(txs: list[Tx], batch_sizes: list[int], sequence_length: int) -> None:
    online_f, online_s = run_online(
        MemoryStateStore(sequence_length), txs, batch_sizes, sequence_length
    )
    offline_f, offline_s = run_offline(txs, sequence_length)
    np.testing.assert_allclose(online_f, offline_f, rtol=0, atol=1e-6)
    np.testing.assert_allclose(online_s, offline_s, rtol=0, atol=1e-6)


def test_baseline_features_follow_the_handbook() -> None:
    # Customer 0: three transactions; terminal 7 saw a fraud 8 days before the last one.
    day = F.MS_PER_DAY
    times = np.array([BASE_MS, BASE_MS + 3 * F.MS_PER_HOUR, BASE_MS + 8 * day + 7 * F.MS_PER_HOUR])
    off = F.offline_features(
        np.array([0, 0, 0]),
        np.array([7, 7, 7]),
        times,
        np.array([10.0, 30.0, 50.0]),
        np.array([1, 0, 0]),
    )
    rows = off.in_input_order()
    col = F.FEATURE_INDEX
    assert rows[0, col["TX_DURING_WEEKEND"]] == 1.0  # 2018-04-01 was a Sunday
    assert rows[2, col["TX_DURING_WEEKEND"]] == 0.0  # the Monday after next
    assert rows[1, col["TX_DURING_NIGHT"]] == 1.0  # 03:00
    assert rows[2, col["TX_DURING_NIGHT"]] == 0.0  # 07:00
    assert rows[1, col["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]] == 2
    assert rows[1, col["CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW"]] == pytest.approx(20.0)
    assert rows[2, col["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]] == 1
    assert rows[2, col["CUSTOMER_ID_NB_TX_30DAY_WINDOW"]] == 3
    assert rows[2, col["CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW"]] == pytest.approx(30.0)
    assert rows[2, col["AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY"]] == pytest.approx(50.0 / 20.0)
    # Day 8's windows end at day 0: two transactions there, one a fraud.
    assert rows[2, col["TERMINAL_ID_NB_TX_1DAY_WINDOW"]] == 2
    assert rows[2, col["TERMINAL_ID_RISK_1DAY_WINDOW"]] == pytest.approx(0.5)
    assert rows[2, col["TERMINAL_ID_RISK_30DAY_WINDOW"]] == pytest.approx(0.5)
    # Within the label delay nothing is known: windows empty, risk 0 not NaN.
    assert rows[1, col["TERMINAL_ID_NB_TX_30DAY_WINDOW"]] == 0
    assert rows[1, col["TERMINAL_ID_RISK_30DAY_WINDOW"]] == 0.0
    assert not np.isnan(rows).any()


def test_sequences_put_the_current_transaction_last_and_pad_in_front() -> None:
    times = BASE_MS + np.arange(4, dtype=np.int64) * F.MS_PER_HOUR
    off = F.offline_features(
        np.array([1, 1, 1, 2]),
        np.array([0, 0, 0, 0]),
        times,
        np.array([1.0, 2.0, 3.0, 4.0]),
        np.zeros(4),
    )
    seqs = off.sequences(2, off.position)
    amount = F.FEATURE_INDEX["TX_AMOUNT"]
    assert seqs[:, :, amount].tolist() == [[0, 1], [1, 2], [2, 3], [0, 4]]


def test_offline_features_handle_the_default_file_size_quickly() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    off = F.offline_features(
        rng.integers(0, 5000, n),
        rng.integers(0, 10_000, n),
        BASE_MS + np.sort(rng.integers(0, 183 * F.MS_PER_DAY, n)),
        np.round(rng.uniform(0, 200, n), 2),
        rng.random(n) < 0.01,
    )
    assert off.features.shape == (n, F.N_FEATURES)
    assert np.isfinite(off.features).all()
