"""The feature definitions: one module read by training, batch scoring and the live worker.

Every transaction gets a vector of :data:`FEATURE_NAMES`. The first 15 are the Fraud
Detection Handbook's baseline features (Le Borgne et al., chapter 3.4); the rest help a
sequence model. The model sees a customer's last ``T`` vectors (the current transaction
last), built by :func:`sequence_index`.

Two paths compute the same numbers from the same functions:

* **offline** (:func:`offline_features`): a whole file at once, vectorised;
* **online** (:func:`online_features`): from a small state object per event, a
  :class:`HistoryBatch` holding each customer's retained recent transactions, each carrying
  the terminal counters as they stood when it was scored. The worker keeps that state in
  Redis (see :mod:`stream_app.state.store`).

Definitions (times are integer epoch milliseconds, UTC; days are ``time // 86_400_000``):

* customer windows (1, 7, 30 days) include the current transaction: the customer's rows
  ``j <= i`` (arrival order) with ``t_j > t_i - w``, and at most the last
  :data:`MAX_CUSTOMER_WINDOW_TX` of them (``j > i - K``). The clock used for windows is the
  running maximum of the customer's times, so an event arriving late cannot see a window
  into its own future. Amount sums use integer thousandths, so both paths give identical
  means. The count bound never binds on Handbook-like data (at most ~160 transactions in 30
  days); it binds on a burst (card testing: thousands of transactions in minutes), and keeps
  the online state and the work per event bounded whatever the history.
* terminal windows are shifted back by the label delay (7 days) in whole hours: for a
  transaction in hour ``H`` (hours since the epoch) the ``w``-day window covers the ``24 w``
  hours ``H - 24 (7 + w)`` to ``H - 24 * 7 - 1`` inclusive, the latest hours whose every label
  was at least 7 days old when the transaction happened. Risk is frauds / transactions in the
  window, 0 where the window is empty. (The Handbook's windows are exact-time; whole hours
  keep the online state to counters while seeing a compromised terminal at most an hour
  later. Day-aligned windows, :data:`FEATURE_VERSION` 1, saw it up to a day later.)
* the time since the customer's previous transaction is capped at 30 days, so the online
  path needs no history older than 30 days before its oldest sequence element, nor more
  than ``K - 1`` transactions before it: ``T - 1 + K`` transactions in all
  (:func:`stream_app.state.store.retained`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

MS_PER_DAY: Final = 86_400_000
MS_PER_HOUR: Final = 3_600_000
HOURS_PER_DAY: Final = 24
# Bumped whenever a definition below changes meaning; a model card records the version its
# model was trained on and the worker refuses another. 1: day-aligned terminal windows;
# 2: hour-aligned terminal windows.
FEATURE_VERSION: Final = 2
CUSTOMER_WINDOWS_DAYS: Final = (1, 7, 30)
TERMINAL_WINDOWS_DAYS: Final = (1, 7, 30)
LABEL_DELAY_DAYS: Final = 7
PREVIOUS_TX_CAP_MS: Final = max(CUSTOMER_WINDOWS_DAYS) * MS_PER_DAY
# Customer history a sequence element needs behind it (its widest window).
CUSTOMER_LOOKBACK_MS: Final = max(CUSTOMER_WINDOWS_DAYS) * MS_PER_DAY
# The most transactions a customer window counts (K, the current one included). Handbook
# customers average at most 4 a day: a simulated 183 days x 5,000 customers (seed 7) and
# data/tx.parquet peak at 157 and 160 in 30 days (Poisson(120) at the top rate), so 256
# never binds there (P(Poisson(120) >= 256) < 1e-20) while a burst of one card costs at
# most ~1.6x the busiest genuine customer per event. Changing it changes the features of
# any customer past it: a FEATURE_VERSION bump.
MAX_CUSTOMER_WINDOW_TX: Final = 256
DEFAULT_SEQUENCE_LENGTH: Final = 5
NIGHT_LAST_HOUR: Final = 6  # the Handbook's night: hour <= 6
_AMOUNT_SCALE: Final = 1000  # amounts summed as integer thousandths: exact on both paths
# The largest amount the features are defined for (the event contract refuses more): the
# 30-day sums in thousandths stay exact in int64 for millions of transactions, and every
# feature stays finite. No card payment comes near a billion units of any currency.
MAX_AMOUNT: Final = 1_000_000_000.0
_EPOCH_WEEKDAY: Final = 3  # 1970-01-01 was a Thursday (Monday = 0)

BASELINE_FEATURES: Final[tuple[str, ...]] = (
    "TX_AMOUNT",
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    *(
        name
        for w in CUSTOMER_WINDOWS_DAYS
        for name in (f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW", f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW")
    ),
    *(
        name
        for w in TERMINAL_WINDOWS_DAYS
        for name in (f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW", f"TERMINAL_ID_RISK_{w}DAY_WINDOW")
    ),
)
SEQUENCE_EXTRA_FEATURES: Final[tuple[str, ...]] = (
    "TX_HOUR_SIN",
    "TX_HOUR_COS",
    "LOG_SECONDS_SINCE_PREV_TX",
    "AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY",
    "LOG_TX_AMOUNT",
)
FEATURE_NAMES: Final[tuple[str, ...]] = BASELINE_FEATURES + SEQUENCE_EXTRA_FEATURES
FEATURE_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(FEATURE_NAMES)}
N_FEATURES: Final = len(FEATURE_NAMES)
N_TERMINAL_WINDOWS: Final = len(TERMINAL_WINDOWS_DAYS)


def terminal_window_hours(
    label_delay_days: int = LABEL_DELAY_DAYS,
) -> tuple[tuple[int, int], ...]:
    """Inclusive hour ranges, relative to the transaction's hour, of each terminal window.

    >>> terminal_window_hours()
    ((-192, -169), (-336, -169), (-888, -169))
    """
    last = -HOURS_PER_DAY * label_delay_days - 1
    return tuple((-HOURS_PER_DAY * (label_delay_days + w), last) for w in TERMINAL_WINDOWS_DAYS)


def terminal_window_days(
    label_delay_days: int = LABEL_DELAY_DAYS,
) -> tuple[tuple[int, int], ...]:
    """Each terminal window's first and last day, relative to the transaction's day.

    A transaction at hour of day ``h`` sees the hours from ``h`` on of its window's first day,
    every hour of the days between, and the hours before ``h`` of the last day (none when
    ``h`` is 0), which is :func:`terminal_window_hours` by days: what lets the online state
    keep day totals and read hour counters only on the two boundary days.

    >>> terminal_window_days()
    ((-8, -7), (-14, -7), (-37, -7))
    """
    return tuple(
        (lo // HOURS_PER_DAY, (hi + 1) // HOURS_PER_DAY)
        for lo, hi in terminal_window_hours(label_delay_days)
    )


def day_index(times_ms: IntArray) -> IntArray:
    """UTC day number (days since 1970-01-01) of each time."""
    return times_ms // MS_PER_DAY


def hour_index(times_ms: IntArray) -> IntArray:
    """Hour number (hours since 1970-01-01T00:00Z) of each time."""
    return times_ms // MS_PER_HOUR


@dataclass(frozen=True)
class HistoryBatch:
    """Recent history of each event of a micro-batch, flattened into columns.

    Rows of one event are contiguous and in arrival order; ``group[i]`` is the event's
    position in the batch (non-decreasing), and the last row of each group is the event
    itself. ``terminal_tx`` / ``terminal_fraud`` hold, per row, the terminal's transaction
    and fraud counts in each of :data:`TERMINAL_WINDOWS_DAYS` when that row was scored.
    """

    group: IntArray
    times_ms: IntArray
    amounts: FloatArray
    terminal_tx: IntArray
    terminal_fraud: IntArray

    def __post_init__(self) -> None:
        n = len(self.group)
        shapes_ok = (
            len(self.times_ms) == n
            and len(self.amounts) == n
            and self.terminal_tx.shape == (n, N_TERMINAL_WINDOWS)
            and self.terminal_fraud.shape == (n, N_TERMINAL_WINDOWS)
        )
        if not shapes_ok:
            raise ValueError("HistoryBatch columns must have one row each, windows as columns")
        if n and np.any(np.diff(self.group) < 0):
            raise ValueError("HistoryBatch rows must be grouped by event (group non-decreasing)")

    @property
    def last_rows(self) -> IntArray:
        """Index of each event's own row (the last of its group)."""
        if len(self.group) == 0:
            return np.zeros(0, dtype=np.int64)
        ends = np.flatnonzero(np.diff(self.group)) if len(self.group) > 1 else np.zeros(0)
        return np.append(ends, len(self.group) - 1).astype(np.int64)


def _group_starts(group: IntArray) -> IntArray:
    """For each row, the index of the first row of its group (rows grouped contiguously)."""
    n = len(group)
    is_start = np.ones(n, dtype=bool)
    if n > 1:
        is_start[1:] = group[1:] != group[:-1]
    starts = np.flatnonzero(is_start).astype(np.int64)
    result: IntArray = starts[np.cumsum(is_start) - 1]
    return result


def _group_rank(group: IntArray) -> IntArray:
    """0, 1, 2, ... numbering of the contiguous groups, one value per row."""
    if len(group) == 0:
        return group.astype(np.int64)
    return np.cumsum(np.r_[0, (group[1:] != group[:-1]).astype(np.int64)])


def _group_running_max(rank: IntArray, values: IntArray) -> IntArray:
    """Running maximum of ``values`` restarting at each group."""
    if len(values) == 0:
        return values.copy()
    # Lift each group above all earlier ones so one global running max stays per group.
    base = int(values.min())
    span = int(values.max()) - base + 1
    lifted = values - base + rank * span
    return np.maximum.accumulate(lifted) - rank * span + base


def customer_features(
    group: IntArray,
    times_ms: IntArray,
    amounts: FloatArray,
    rows: IntArray | None = None,
) -> FloatArray:
    """Customer-window features of ``rows`` (default: every row).

    Returns ``[len(rows), 2 * len(CUSTOMER_WINDOWS_DAYS) + 2]`` columns: for each window the
    transaction count and mean amount, then the capped time since the previous transaction
    (log seconds) and the amount over the mean of the customer's prior 30-day transactions.
    ``group`` must be contiguous, each group in arrival order. A window starts no earlier
    than :data:`MAX_CUSTOMER_WINDOW_TX` rows back, so a row needs at most that many rows of
    its group (itself included) and the 30 days before it.

    >>> day = MS_PER_DAY
    >>> customer_features(np.zeros(3, np.int64), np.array([0, day, 2 * day]),
    ...                   np.array([10.0, 20.0, 30.0]))[:, :2].tolist()
    [[1.0, 10.0], [1.0, 20.0], [1.0, 30.0]]
    """
    n = len(group)
    rows = np.arange(n, dtype=np.int64) if rows is None else rows
    starts = _group_starts(group)
    rank = _group_rank(group)
    clock = _group_running_max(rank, times_ms)
    low = int(clock.min()) if n else 0
    span = (int(clock.max()) - low if n else 0) + CUSTOMER_LOOKBACK_MS + 1
    key = rank * span + (clock - low)
    milli = np.rint(amounts * _AMOUNT_SCALE).astype(np.int64)
    csum = np.concatenate(([0], np.cumsum(milli)))

    out = np.empty((len(rows), 2 * len(CUSTOMER_WINDOWS_DAYS) + 2), dtype=np.float64)
    k = key[rows]
    for i, w in enumerate(CUSTOMER_WINDOWS_DAYS):
        first = np.maximum(
            np.searchsorted(key, k - w * MS_PER_DAY, side="right"),
            rows - (MAX_CUSTOMER_WINDOW_TX - 1),
        )
        count = rows - first + 1
        out[:, 2 * i] = count
        out[:, 2 * i + 1] = (csum[rows + 1] - csum[first]) / count / _AMOUNT_SCALE

    has_prev = rows > starts[rows]
    prev = np.where(has_prev, rows - 1, rows)
    gap = np.where(has_prev, clock[rows] - clock[prev], PREVIOUS_TX_CAP_MS)
    out[:, -2] = np.log1p(np.minimum(gap, PREVIOUS_TX_CAP_MS) / 1000.0)

    last_window = 2 * (len(CUSTOMER_WINDOWS_DAYS) - 1)
    n30 = out[:, last_window]
    sum30 = out[:, last_window + 1] * n30 * _AMOUNT_SCALE
    prior_n = n30 - 1
    prior_mean = np.divide(
        sum30 - milli[rows], prior_n * _AMOUNT_SCALE, out=np.zeros(len(rows)), where=prior_n > 0
    )
    ratio = np.divide(amounts[rows], prior_mean, out=np.ones(len(rows)), where=prior_mean > 0)
    out[:, -1] = np.where(prior_n > 0, ratio, 1.0)
    return out


def terminal_features(terminal_tx: IntArray, terminal_fraud: IntArray) -> FloatArray:
    """Per window: the terminal's transaction count and its risk (frauds / transactions)."""
    tx = terminal_tx.astype(np.float64)
    risk = np.divide(
        terminal_fraud.astype(np.float64), tx, out=np.zeros_like(tx), where=terminal_tx > 0
    )
    out = np.empty((len(tx), 2 * N_TERMINAL_WINDOWS), dtype=np.float64)
    out[:, 0::2] = tx
    out[:, 1::2] = risk
    return out


def calendar_features(times_ms: IntArray) -> FloatArray:
    """Weekend flag, night flag, and the hour of day on the unit circle (sin, cos)."""
    days = day_index(times_ms)
    ms_of_day = times_ms - days * MS_PER_DAY
    hour = ms_of_day // MS_PER_HOUR
    angle = 2.0 * np.pi * ms_of_day / MS_PER_DAY
    out = np.empty((len(times_ms), 4), dtype=np.float64)
    out[:, 0] = (days + _EPOCH_WEEKDAY) % 7 >= 5
    out[:, 1] = hour <= NIGHT_LAST_HOUR
    out[:, 2] = np.sin(angle)
    out[:, 3] = np.cos(angle)
    return out


def assemble_features(
    times_ms: IntArray,
    amounts: FloatArray,
    customer: FloatArray,
    terminal: FloatArray,
) -> FloatArray:
    """Stack the parts into rows of :data:`FEATURE_NAMES`, in that order."""
    n_cw = 2 * len(CUSTOMER_WINDOWS_DAYS)
    cal = calendar_features(times_ms)
    return np.column_stack(
        [
            amounts,
            cal[:, 0],
            cal[:, 1],
            customer[:, :n_cw],
            terminal,
            cal[:, 2],
            cal[:, 3],
            customer[:, n_cw],
            customer[:, n_cw + 1],
            np.log1p(amounts),
        ]
    ).astype(np.float64)


def features_of_rows(history: HistoryBatch, rows: IntArray) -> FloatArray:
    """Feature vectors of the given rows of a history batch (the online path's core)."""
    customer = customer_features(history.group, history.times_ms, history.amounts, rows)
    terminal = terminal_features(history.terminal_tx[rows], history.terminal_fraud[rows])
    return assemble_features(history.times_ms[rows], history.amounts[rows], customer, terminal)


def online_features(
    history: HistoryBatch, sequence_length: int = DEFAULT_SEQUENCE_LENGTH
) -> tuple[FloatArray, FloatArray]:
    """Each event's feature vector and its sequence, from its customer's retained history.

    Returns ``(features [B, F], sequences [B, T, F])``; a sequence holds the event's last
    ``T`` rows, the event itself last, zero rows in front when the history is shorter.
    """
    index = sequence_index(history.group, sequence_length, history.last_rows)
    flat = index.ravel()
    present = flat >= 0
    vectors = features_of_rows(history, flat[present])
    rows = np.zeros((len(flat), N_FEATURES), dtype=np.float64)
    rows[present] = vectors
    sequences = rows.reshape(len(index), sequence_length, N_FEATURES)
    return sequences[:, -1, :].copy(), sequences


def sequence_index(group: IntArray, sequence_length: int, rows: IntArray | None = None) -> IntArray:
    """Row indices of each row's sequence: ``[len(rows), T]``, itself last, -1 for padding.

    >>> sequence_index(np.array([0, 0, 0, 1]), 2).tolist()
    [[-1, 0], [0, 1], [1, 2], [-1, 3]]
    """
    if sequence_length < 1:
        raise ValueError("sequence_length must be at least 1")
    rows = np.arange(len(group), dtype=np.int64) if rows is None else rows
    starts = _group_starts(group)[rows]
    back = np.arange(sequence_length - 1, -1, -1, dtype=np.int64)
    index = rows[:, None] - back[None, :]
    return np.where(index >= starts[:, None], index, -1)


def gather_sequences(
    features: FloatArray, index: IntArray, dtype: type[np.floating[Any]] = np.float32
) -> npt.NDArray[Any]:
    """Sequences ``[len(index), T, F]`` of precomputed rows; -1 gives a zero row."""
    padded = np.vstack([features.astype(dtype), np.zeros((1, features.shape[1]), dtype)])
    return padded[np.where(index >= 0, index, len(features))]


@dataclass(frozen=True)
class OfflineFeatures:
    """Features of a whole transactions file, rows in the canonical order.

    ``order`` maps canonical rows back to the input rows: ``features[k]`` belongs to input row
    ``order[k]``. Canonical order is customer, then time, then transaction order given, the
    order in which the worker sees each customer's events when they are replayed by time.
    """

    order: IntArray
    group: IntArray
    features: FloatArray

    def sequences(
        self,
        sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
        rows: IntArray | None = None,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> npt.NDArray[Any]:
        """Sequences of the given canonical rows (default all)."""
        index = sequence_index(self.group, sequence_length, rows)
        return gather_sequences(self.features, index, dtype)

    @property
    def position(self) -> IntArray:
        """Canonical row of each input row (the inverse of ``order``)."""
        pos = np.empty_like(self.order)
        pos[self.order] = np.arange(len(self.order))
        return pos

    def in_input_order(self) -> FloatArray:
        """The feature matrix with rows back in the input's order."""
        out = np.empty_like(self.features)
        out[self.order] = self.features
        return out


def terminal_window_counts(
    terminal_ids: IntArray,
    times_ms: IntArray,
    is_fraud: npt.NDArray[np.bool_] | IntArray,
    label_delay_days: int = LABEL_DELAY_DAYS,
) -> tuple[IntArray, IntArray]:
    """Offline terminal counters: each row's terminal transaction and fraud counts per window.

    Every label is taken as known once the delay has passed, which is what the online
    counters see when labels arrive within the delay.
    """
    n = len(terminal_ids)
    if n == 0:
        empty = np.zeros((0, N_TERMINAL_WINDOWS), dtype=np.int64)
        return empty, empty.copy()
    _, term = np.unique(terminal_ids, return_inverse=True)
    windows = terminal_window_hours(label_delay_days)
    widest = max(-lo for lo, _ in windows)
    hours = hour_index(np.asarray(times_ms, dtype=np.int64))
    rel = hours - (int(hours.min()) - widest)  # every window's first hour is >= 0
    # One sorted key per transaction, each terminal in a block of its own: a window of a
    # row never reaches into another terminal's block.
    key = term.astype(np.int64) * (int(rel.max()) + 1) + rel
    every = np.sort(key)
    frauds = np.sort(key[np.asarray(is_fraud, dtype=bool)])
    tx = np.empty((n, N_TERMINAL_WINDOWS), dtype=np.int64)
    fraud = np.empty_like(tx)
    for i, (lo, hi) in enumerate(windows):
        for out, keys in ((tx, every), (fraud, frauds)):
            out[:, i] = np.searchsorted(keys, key + hi, side="right") - np.searchsorted(
                keys, key + lo, side="left"
            )
    return tx, fraud


def offline_features(
    customer_ids: Sequence[object] | npt.NDArray[np.generic],
    terminal_ids: Sequence[object] | npt.NDArray[np.generic],
    times_ms: IntArray,
    amounts: FloatArray,
    is_fraud: npt.NDArray[np.bool_] | IntArray,
    label_delay_days: int = LABEL_DELAY_DAYS,
) -> OfflineFeatures:
    """Features of a whole file, vectorised; labels are known after ``label_delay_days``.

    Rows may come in any order; they are put in canonical order (customer, time, then the
    given order), which :class:`OfflineFeatures` records.
    """
    times_ms = np.asarray(times_ms, dtype=np.int64)
    amounts = np.asarray(amounts, dtype=np.float64)
    _, cust = np.unique(np.asarray(customer_ids), return_inverse=True)
    _, term = np.unique(np.asarray(terminal_ids), return_inverse=True)
    order = np.lexsort((np.arange(len(times_ms)), times_ms, cust)).astype(np.int64)
    group = cust[order].astype(np.int64)
    t = times_ms[order]
    a = amounts[order]
    term_tx, term_fraud = terminal_window_counts(
        term.astype(np.int64)[order],
        t,
        np.asarray(is_fraud, dtype=np.int64)[order],
        label_delay_days,
    )
    customer = customer_features(group, t, a)
    terminal = terminal_features(term_tx, term_fraud)
    features = assemble_features(t, a, customer, terminal)
    return OfflineFeatures(order=order, group=group, features=features)
