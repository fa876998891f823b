"""Training, validation and test sets cut from one transactions file by period.

Features are always computed once, from the file's whole history, by
:func:`stream_app.features.offline_features` (terminal windows see labels only after the 7-day
delay); a period only selects rows. A *row* here is a canonical row of
:class:`~stream_app.features.OfflineFeatures` (customer, then time). A card is a customer, as
in the Fraud Detection Handbook.

Three things live here:

* :class:`Period` and :class:`FileFeatures.rows`: which rows fall in a range of days;
* :func:`known_compromised`: the test rows of cards already known to be compromised, which
  the Handbook's protocol removes from a test set;
* :class:`SequenceSet`: sequences, labels and the (day, card) keys the card-level metrics
  need, for any set of rows, plus the oversampling and mixing used to augment training sets;
* :func:`apply_label_files`: analysts' verdicts (``fraudstream labels export``) in place of
  a transactions table's ``TX_FRAUD``, before any of the above is computed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from stream_app import features
from stream_app.console.export import LABEL_FILE_COLUMNS, LabelColumn
from stream_app.errors import ConfigError
from training.transactions import epoch_ms, to_arrays

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
SequenceArray = npt.NDArray[np.float32]

N_BASELINE: Final = len(features.BASELINE_FEATURES)
_EPOCH: Final = dt.date(1970, 1, 1)


def epoch_day(day: dt.date | str) -> int:
    """Days since 1970-01-01 of a date (or ISO date string), the unit :func:`day_index` uses.

    >>> epoch_day("2018-07-25")
    17737
    """
    try:
        date = dt.date.fromisoformat(day) if isinstance(day, str) else day
    except ValueError:
        raise ConfigError(f"expected an ISO date such as 2018-07-25, got {day!r}") from None
    return (date - _EPOCH).days


def iso_day(day: int) -> str:
    """The ISO date of an epoch day (inverse of :func:`epoch_day`).

    >>> iso_day(17737)
    '2018-07-25'
    """
    return (_EPOCH + dt.timedelta(days=day)).isoformat()


@dataclass(frozen=True)
class Period:
    """A range of whole UTC days, ``first_day`` to ``last_day`` inclusive (epoch days)."""

    first_day: int
    last_day: int

    def __post_init__(self) -> None:
        if self.last_day < self.first_day:
            raise ConfigError(f"period ends ({self.last_day}) before it starts ({self.first_day})")

    @classmethod
    def starting(cls, start: dt.date | str, days: int) -> Period:
        """``days`` days from ``start``.

        >>> Period.starting("2018-07-25", 7).label
        '2018-07-25..2018-07-31'
        """
        if days < 1:
            raise ConfigError(f"a period needs at least one day, got {days}")
        first = epoch_day(start)
        return cls(first, first + days - 1)

    @classmethod
    def parse(cls, label: str) -> Period:
        """The period of a :attr:`label` (``first..last``, ISO dates).

        >>> Period.parse("2018-07-25..2018-07-31").days
        7
        """
        first, separator, last = label.partition("..")
        if not separator:
            raise ConfigError(f"expected a period such as 2018-07-25..2018-07-31, got {label!r}")
        return cls(epoch_day(first), epoch_day(last))

    @property
    def days(self) -> int:
        """Number of days in the period."""
        return self.last_day - self.first_day + 1

    @property
    def label(self) -> str:
        """``first..last`` as ISO dates."""
        return f"{iso_day(self.first_day)}..{iso_day(self.last_day)}"

    def shifted(self, days: int) -> Period:
        """The same period moved by ``days`` (negative: earlier)."""
        return Period(self.first_day + days, self.last_day + days)


@dataclass(frozen=True)
class FileFeatures:
    """A transactions file's features with, per canonical row, the columns periods need."""

    offline: features.OfflineFeatures
    times_ms: IntArray
    days: IntArray
    customers: IntArray
    terminals: IntArray
    labels: IntArray
    transaction_ids: IntArray
    scenarios: IntArray

    @property
    def first_day(self) -> int:
        """First epoch day with a transaction."""
        return int(self.days.min())

    @property
    def last_day(self) -> int:
        """Last epoch day with a transaction."""
        return int(self.days.max())

    def rows(self, period: Period) -> IntArray:
        """Canonical rows whose day falls in ``period``, in canonical order."""
        inside = (self.days >= period.first_day) & (self.days <= period.last_day)
        return np.flatnonzero(inside).astype(np.int64)

    def require(self, period: Period, what: str) -> IntArray:
        """Like :meth:`rows`, but a period without a single fraud is a configuration error."""
        rows = self.rows(period)
        if len(rows) == 0 or not self.labels[rows].any():
            raise ConfigError(
                f"the {what} period {period.label} holds {len(rows)} transactions and no fraud; "
                f"the file covers {iso_day(self.first_day)}..{iso_day(self.last_day)}"
            )
        return rows

    def baseline(self, rows: IntArray) -> FloatArray:
        """The Handbook's 15 baseline features of ``rows`` (the reference models' input)."""
        return self.offline.features[rows, :N_BASELINE]

    def sequence_set(self, rows: IntArray, sequence_length: int) -> SequenceSet:
        """Sequences and keys of ``rows``."""
        return SequenceSet(
            sequences=self.offline.sequences(sequence_length, rows),
            labels=self.labels[rows],
            days=self.days[rows],
            customers=self.customers[rows],
        )


def file_features(df: pd.DataFrame) -> FileFeatures:
    """Compute the features of a whole transactions table (labels known after the delay)."""
    arrays = to_arrays(df)
    offline = features.offline_features(
        arrays.customer_ids,
        arrays.terminal_ids,
        arrays.times_ms,
        arrays.amounts,
        arrays.is_fraud,
    )
    order = offline.order
    return FileFeatures(
        offline=offline,
        times_ms=arrays.times_ms[order],
        days=features.day_index(arrays.times_ms[order]),
        customers=arrays.customer_ids[order],
        terminals=arrays.terminal_ids[order],
        labels=arrays.is_fraud[order].astype(np.int64),
        transaction_ids=arrays.transaction_ids[order],
        scenarios=df["TX_FRAUD_SCENARIO"].to_numpy(dtype=np.int64)[order],
    )


def known_compromised(
    days: IntArray,
    customers: IntArray,
    labels: IntArray,
    candidate_rows: IntArray,
    train_first_day: int,
    delay_days: int,
) -> npt.NDArray[np.bool_]:
    """Which candidate (test) rows belong to a card already known to be compromised.

    Following the Handbook's ``get_train_test_set``: a card is known on test day ``t`` once it
    had a fraud between the first training day and day ``t - delay_days - 1`` (the training
    period's frauds, then one more delay-period day per test day), so for the default 7-day
    delay the frauds of day ``t - 8`` or earlier.

    Args:
        days, customers, labels: per row of the whole file.
        candidate_rows: the rows of the test period.
        train_first_day: first day of the training period; older frauds do not count.
        delay_days: length of the delay period.

    Returns:
        One flag per candidate row: true where the row must be removed.

    >>> days = np.array([0, 3, 9, 9, 10])
    >>> cards = np.array([1, 2, 1, 2, 2])
    >>> fraud = np.array([1, 1, 0, 0, 0])
    >>> known_compromised(days, cards, fraud, np.array([2, 3, 4]), 0, 5).tolist()
    [True, True, True]
    >>> known_compromised(days, cards, fraud, np.array([2, 3, 4]), 1, 5).tolist()
    [False, True, True]
    >>> known_compromised(days, cards, fraud, np.array([2, 3, 4]), 0, 6).tolist()
    [True, False, True]
    """
    frauds = np.flatnonzero((labels == 1) & (days >= train_first_day))
    if len(frauds) == 0:
        return np.zeros(len(candidate_rows), dtype=bool)
    # Each card's first fraud day since training started; a card is known from then on.
    fraud_cards = customers[frauds]
    order = np.lexsort((days[frauds], fraud_cards))
    cards_sorted = fraud_cards[order]
    first_of_card = np.r_[True, cards_sorted[1:] != cards_sorted[:-1]]
    cards = cards_sorted[first_of_card]
    first_day = days[frauds][order][first_of_card]
    cand_cards = customers[candidate_rows]
    at = np.clip(np.searchsorted(cards, cand_cards), 0, len(cards) - 1)
    has_fraud = cards[at] == cand_cards
    known: npt.NDArray[np.bool_] = has_fraud & (
        first_day[at] <= days[candidate_rows] - delay_days - 1
    )
    return known


@dataclass(frozen=True)
class SequenceSet:
    """Model inputs of some transactions: raw sequences ``[n, T, F]`` and their keys."""

    sequences: SequenceArray
    labels: IntArray
    days: IntArray
    customers: IntArray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def frauds(self) -> SequenceArray:
        """The fraud sequences (what the GAN learns from)."""
        frauds: SequenceArray = self.sequences[self.labels == 1]
        return frauds

    def subset(self, mask: npt.NDArray[np.bool_] | IntArray) -> SequenceSet:
        """Rows selected by a boolean mask or an index array."""
        return SequenceSet(
            sequences=self.sequences[mask],
            labels=self.labels[mask],
            days=self.days[mask],
            customers=self.customers[mask],
        )

    def with_frauds(self, extra: SequenceArray) -> SequenceSet:
        """This set plus ``extra`` fraud sequences (synthetic or repeated); keys are -1."""
        n = len(extra)
        minus = np.full(n, -1, dtype=np.int64)
        return SequenceSet(
            sequences=np.concatenate([self.sequences, extra.astype(np.float32)]),
            labels=np.concatenate([self.labels, np.ones(n, dtype=np.int64)]),
            days=np.concatenate([self.days, minus]),
            customers=np.concatenate([self.customers, minus]),
        )


def oversample_frauds(train: SequenceSet, ratio: float, rng: np.random.Generator) -> SequenceArray:
    """``round(ratio * frauds)`` fraud sequences of ``train`` drawn again with replacement."""
    frauds = train.frauds
    n = round(ratio * len(frauds))
    if n == 0 or len(frauds) == 0:
        return np.zeros((0, *train.sequences.shape[1:]), dtype=np.float32)
    return frauds[rng.integers(0, len(frauds), n)]


@dataclass(frozen=True)
class LabelMerge:
    """What :func:`apply_label_files` did with the labels it read.

    Every label read is counted once: ``applied + superseded + unknown + mismatched ==
    read``.
    """

    files: tuple[str, ...]
    read: int
    applied: int  # transactions given a label's verdict (their latest valid label)
    changed: int  # of those, how many had another TX_FRAUD before
    unknown: int  # labels naming a transaction id the table does not hold
    mismatched: int  # labels refused: another customer, terminal or time than the table's
    superseded: int  # valid labels replaced by a later verdict on the same transaction

    def summary(self) -> str:
        """One line for the terminal."""
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        line = (
            f"{self.applied} labels applied, {self.changed} changed TX_FRAUD, {self.unknown} "
            f"unknown, {self.mismatched} mismatched (refused); {self.read} read from {files}"
        )
        return line + (f", {self.superseded} superseded" if self.superseded else "")

    def to_dict(self) -> dict[str, Any]:
        """The counts, for a model card."""
        return {
            "read": self.read,
            "applied": self.applied,
            "changed": self.changed,
            "unknown": self.unknown,
            "mismatched": self.mismatched,
            "superseded": self.superseded,
        }


def apply_label_files(
    frame: pd.DataFrame, paths: Sequence[Path]
) -> tuple[pd.DataFrame, LabelMerge]:
    """A transactions table whose ``TX_FRAUD`` follows the verdicts of label files.

    The label files are those ``fraudstream labels export`` writes (columns
    :data:`~stream_app.console.export.LABEL_FILE_COLUMNS`, Parquet or CSV, told by their
    content). A label counts as the worker counts one: its transaction id must be in the
    table (compared as text, as on the topics), with the label's customer, terminal and
    time to the millisecond; one naming another is refused, like the worker's
    ``label_mismatch``, because it is a verdict on some other transaction. Of a
    transaction's valid labels, from any of the files, the latest ``REPORTED_AT`` wins
    (a tie: the later file, then the later row), so a correction is applied.

    Only ``TX_FRAUD`` changes: features computed from the result (terminal risk included)
    see the analysts' verdicts, as the worker's state does once it reads their labels.
    ``TX_FRAUD_SCENARIO``, the simulator's record of how a fraud was made, is left as is.

    Args:
        frame: A table from :func:`training.transactions.read_transactions`.
        paths: Label files, applied together.

    Returns:
        A new table (``frame`` is not changed) and what the labels did.

    Raises:
        ConfigError: a file missing, unreadable, or without the label columns; a value
            that is not a label's; transaction ids repeated in the table.
    """
    if not paths:
        return frame, LabelMerge((), 0, 0, 0, 0, 0, 0)
    labels = pd.concat([_read_label_file(path) for path in paths], ignore_index=True)
    read = len(labels)
    tx_ids = pd.Index(frame["TRANSACTION_ID"].astype(str))
    if read and not tx_ids.is_unique:
        raise ConfigError("transaction ids repeat in the data file: a label could name several")
    at = tx_ids.get_indexer(pd.Index(labels[LabelColumn.TRANSACTION_ID]))
    known = at >= 0
    rows = at[known]
    same = (
        (labels[LabelColumn.CUSTOMER_ID].to_numpy()[known] == _text(frame, "CUSTOMER_ID", rows))
        & (labels[LabelColumn.TERMINAL_ID].to_numpy()[known] == _text(frame, "TERMINAL_ID", rows))
        & (
            epoch_ms(labels[LabelColumn.TX_DATETIME])[known]
            == epoch_ms(frame["TX_DATETIME"].iloc[rows])
        )
    )
    valid = np.flatnonzero(known)[same]
    # The latest verdict of each transaction: sort by (row, reported_at, order read), keep
    # each row's last.
    reported = epoch_ms(labels[LabelColumn.REPORTED_AT])[valid]
    order = np.lexsort((valid, reported, at[valid]))
    ranked = valid[order]
    last = np.r_[at[ranked][1:] != at[ranked][:-1], True] if len(ranked) else np.array([], bool)
    winners = ranked[last]
    targets = at[winners]
    verdicts = labels[LabelColumn.TX_FRAUD].to_numpy(dtype=np.int64)[winners]
    out = frame.copy()
    fraud = out["TX_FRAUD"].to_numpy(copy=True)
    before = fraud[targets].astype(np.int64)
    fraud[targets] = verdicts
    out["TX_FRAUD"] = fraud
    return out, LabelMerge(
        files=tuple(str(path) for path in paths),
        read=read,
        applied=len(winners),
        changed=int((before != verdicts).sum()),
        unknown=int((~known).sum()),
        mismatched=int((~same).sum()),
        superseded=len(valid) - len(winners),
    )


def _text(frame: pd.DataFrame, column: str, rows: IntArray) -> npt.NDArray[np.object_]:
    """A table's id column at ``rows`` as text (how the labels name them)."""
    return frame[column].iloc[rows].astype(str).to_numpy(dtype=object)


def _read_label_file(path: Path) -> pd.DataFrame:
    """A label file as text ids, UTC times and 0/1 verdicts; Parquet or CSV by content."""
    if not path.is_file():
        raise ConfigError(f"label file {path} does not exist")
    with path.open("rb") as handle:
        parquet = handle.read(4) == b"PAR1"
    ids = (LabelColumn.TRANSACTION_ID, LabelColumn.CUSTOMER_ID, LabelColumn.TERMINAL_ID)
    try:
        if parquet:
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, dtype={str(c): str for c in ids}, keep_default_na=False)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot read label file {path}: {exc}") from None
    missing = [c for c in LABEL_FILE_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(
            f"label file {path} lacks the columns {', '.join(missing)} "
            "(write one with fraudstream labels export)"
        )
    try:
        for column in ids:
            table[column] = table[column].astype(str)
        for column in (LabelColumn.TX_DATETIME, LabelColumn.REPORTED_AT):
            # UTC, then naive: the transactions table's convention, for epoch_ms
            table[column] = pd.to_datetime(table[column], utc=True).dt.tz_localize(None)
        verdicts = pd.to_numeric(table[LabelColumn.TX_FRAUD], errors="raise")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"label file {path} holds a value of the wrong type: {exc}") from None
    if not verdicts.isin([0, 1]).all():
        raise ConfigError(f"label file {path}: {LabelColumn.TX_FRAUD} must be 0 or 1")
    table[LabelColumn.TX_FRAUD] = verdicts.astype(np.int64)
    return table[list(LABEL_FILE_COLUMNS)]
