"""The feature definitions: online (state store) equals offline (whole file) to 1e-6."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_app import features as F
from stream_app.state.store import TRIM_SLACK, max_history
from tests.feature_cases import (
    BASE_MS,
    Tx,
    bursts,
    replay_online,
    run_offline,
    transactions,
)
from tests.memory_state import MemoryStateStore


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    txs=transactions,
    batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    sequence_length=st.integers(1, 6),
)
def test_online_equals_offline(txs: list[Tx], batch_sizes: list[int], sequence_length: int) -> None:
    store = MemoryStateStore(sequence_length)
    online_f, online_s = asyncio.run(replay_online(store, txs, batch_sizes, sequence_length))
    offline_f, offline_s = run_offline(txs, sequence_length)
    np.testing.assert_allclose(online_f, offline_f, rtol=0, atol=1e-6)
    np.testing.assert_allclose(online_s, offline_s, rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    txs=bursts(),
    batch_sizes=st.lists(st.integers(1, 64), min_size=1, max_size=4),
    sequence_length=st.integers(1, 6),
)
def test_online_equals_offline_past_the_window_bound(
    txs: list[Tx], batch_sizes: list[int], sequence_length: int
) -> None:
    """A burst longer than K: windows count K, the stored history stays bounded, both agree."""
    store = MemoryStateStore(sequence_length)
    online_f, online_s = asyncio.run(replay_online(store, txs, batch_sizes, sequence_length))
    offline_f, offline_s = run_offline(txs, sequence_length)
    np.testing.assert_allclose(online_f, offline_f, rtol=0, atol=1e-6)
    np.testing.assert_allclose(online_s, offline_s, rtol=0, atol=1e-6)
    count_30 = offline_f[:, F.FEATURE_INDEX["CUSTOMER_ID_NB_TX_30DAY_WINDOW"]]
    assert count_30.max() == F.MAX_CUSTOMER_WINDOW_TX  # the bound binds
    longest = max(len(entries) for entries in store.customers.values())
    assert longest < max_history(sequence_length) + TRIM_SLACK


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
    # At day 8, 07:00 the 1-day window is day 0, 07:00 to day 1, 06:59 (the Handbook's
    # (t - 8d, t - 7d], in whole hours): it misses both transactions of day 0's small hours,
    # which the 7- and 30-day windows hold, one a fraud.
    assert rows[2, col["TERMINAL_ID_NB_TX_1DAY_WINDOW"]] == 0
    assert rows[2, col["TERMINAL_ID_NB_TX_7DAY_WINDOW"]] == 2
    assert rows[2, col["TERMINAL_ID_RISK_7DAY_WINDOW"]] == pytest.approx(0.5)
    assert rows[2, col["TERMINAL_ID_RISK_30DAY_WINDOW"]] == pytest.approx(0.5)
    # Within the label delay nothing is known: windows empty, risk 0 not NaN.
    assert rows[1, col["TERMINAL_ID_NB_TX_30DAY_WINDOW"]] == 0
    assert rows[1, col["TERMINAL_ID_RISK_30DAY_WINDOW"]] == 0.0
    assert not np.isnan(rows).any()


def test_terminal_windows_end_on_the_last_whole_hour_past_the_label_delay() -> None:
    # A fraud at 10:30 on day 0 at terminal 7, then three transactions there 7 days on.
    fraud_at = BASE_MS + 10 * F.MS_PER_HOUR + 30 * 60_000
    later = (
        BASE_MS
        + 7 * F.MS_PER_DAY
        + np.array(
            [
                10 * F.MS_PER_HOUR + 45 * 60_000,
                11 * F.MS_PER_HOUR,
                10 * F.MS_PER_HOUR + 31 * F.MS_PER_DAY,
            ]
        )
    )
    off = F.offline_features(
        np.array([0, 1, 2, 3]),
        np.array([7, 7, 7, 7]),
        np.r_[fraud_at, later],
        np.ones(4),
        np.array([1, 0, 0, 0]),
    )
    risk = off.in_input_order()[1:, F.FEATURE_INDEX["TERMINAL_ID_RISK_1DAY_WINDOW"]]
    risk30 = off.in_input_order()[1:, F.FEATURE_INDEX["TERMINAL_ID_RISK_30DAY_WINDOW"]]
    # 10:45 seven days on: hour 10 of day 0 is not yet wholly 7 days old, so not seen.
    # 11:00: it is. Thirty-one days on, it is out of the 30-day window again.
    assert risk.tolist() == [0.0, 1.0, 0.0]
    assert risk30.tolist() == [0.0, 1.0, 0.0]


def test_sequences_put_the_current_transaction_last_and_pad_in_front() -> None:
    times = BASE_MS + np.arange(4, dtype=np.int64) * F.MS_PER_HOUR
    off = F.offline_features(
        np.array([1, 1, 1, 2]),
        np.array([0, 0, 0, 0]),
        times,
        np.array([1.0, 2.0, 3.0, 4.0]),
        np.zeros(4, dtype=np.int64),
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
