"""Period selection and sequence sets (training/dataset.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stream_app import features
from stream_app.errors import ConfigError
from training.dataset import (
    FileFeatures,
    Period,
    SequenceSet,
    epoch_day,
    file_features,
    oversample_frauds,
)
from training.simulator import SimulatorConfig, simulate

T = 4


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return simulate(SimulatorConfig(n_customers=200, n_terminals=400, n_days=20, radius=10.0))


@pytest.fixture(scope="module")
def data(frame: pd.DataFrame) -> FileFeatures:
    return file_features(frame)


def test_columns_follow_the_canonical_order(frame: pd.DataFrame, data: FileFeatures) -> None:
    order = data.offline.order
    assert (data.transaction_ids == frame["TRANSACTION_ID"].to_numpy()[order]).all()
    assert (data.customers == frame["CUSTOMER_ID"].to_numpy()[order]).all()
    assert (data.labels == frame["TX_FRAUD"].to_numpy()[order]).all()
    assert (data.scenarios == frame["TX_FRAUD_SCENARIO"].to_numpy()[order]).all()
    days = (frame["TX_DATETIME"] - pd.Timestamp("1970-01-01")).dt.days.to_numpy()
    assert (data.days == days[order]).all()


def test_rows_select_whole_days(data: FileFeatures) -> None:
    period = Period.starting("2018-04-05", 3)
    rows = data.rows(period)
    assert len(rows) > 0
    assert set(np.unique(data.days[rows])) == {epoch_day("2018-04-05") + i for i in range(3)}
    assert np.all(np.diff(rows) > 0)
    outside = np.setdiff1d(np.arange(len(data.days)), rows)
    assert not np.any(
        (data.days[outside] >= period.first_day) & (data.days[outside] <= period.last_day)
    )


def test_require_refuses_a_period_without_fraud(data: FileFeatures) -> None:
    with pytest.raises(ConfigError, match="no fraud"):
        data.require(Period.starting("2019-01-01", 7), "training")
    assert len(data.require(Period.starting("2018-04-05", 7), "training")) > 0


def test_dates_must_be_iso() -> None:
    with pytest.raises(ConfigError, match="ISO date"):
        epoch_day("25/07/2018")


def test_period_must_not_end_before_it_starts() -> None:
    with pytest.raises(ConfigError):
        Period(10, 9)
    with pytest.raises(ConfigError):
        Period.starting("2018-04-01", 0)


def test_sequence_set_holds_the_rows_sequences(data: FileFeatures) -> None:
    rows = data.rows(Period.starting("2018-04-10", 2))
    subset = data.sequence_set(rows, T)
    assert subset.sequences.shape == (len(rows), T, features.N_FEATURES)
    # The current transaction is last: its features are the row's own.
    np.testing.assert_allclose(
        subset.sequences[:, -1, :], data.offline.features[rows].astype(np.float32)
    )
    assert (subset.labels == data.labels[rows]).all()
    assert len(subset.frauds) == int(subset.labels.sum())


def test_extra_frauds_are_marked_as_not_real(data: FileFeatures) -> None:
    subset = data.sequence_set(data.rows(Period.starting("2018-04-10", 2)), T)
    extra = oversample_frauds(subset, 0.5, np.random.default_rng(0))
    assert len(extra) == round(0.5 * len(subset.frauds))
    # Every repeated sequence is one of the real frauds.
    real = {s.tobytes() for s in subset.frauds}
    assert all(s.tobytes() in real for s in extra)
    mixed = subset.with_frauds(extra)
    assert len(mixed) == len(subset) + len(extra)
    assert (mixed.labels[len(subset) :] == 1).all()
    assert (mixed.days[len(subset) :] == -1).all() and (mixed.days[: len(subset)] >= 0).all()


def test_oversampling_nothing() -> None:
    empty = SequenceSet(
        sequences=np.zeros((3, T, features.N_FEATURES), dtype=np.float32),
        labels=np.zeros(3, dtype=np.int64),
        days=np.zeros(3, dtype=np.int64),
        customers=np.zeros(3, dtype=np.int64),
    )
    assert oversample_frauds(empty, 1.0, np.random.default_rng(0)).shape == (0, T, 20)
