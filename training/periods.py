"""The periods ``train`` and ``evaluate`` use, fitted to a data file's own dates.

The defaults are the Handbook's dates (its 183 days from 2018-04-01), which reproduce the
shipped model and the benchmark. On a file that does not cover them (say 60 days the user
just simulated) a default that was not given on the command line is derived from the file
instead: the test period ends on the file's last day, training goes back as far as the
file allows. A period given explicitly that does not fit is an error naming the option
and a value that works.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stream_app.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

# The label delay between the training and the test periods, in days (the protocol's).
DELAY_DAYS = 7


@dataclass(frozen=True)
class FileDays:
    """The first and last day a transactions file holds."""

    first: dt.date
    last: dt.date

    @property
    def label(self) -> str:
        """``2018-04-01..2018-05-30 (60 days)``."""
        days = (self.last - self.first).days + 1
        return f"{self.first}..{self.last} ({days} days)"


def file_days(frame: pd.DataFrame) -> FileDays:
    """The days a transactions table (:func:`training.transactions.read_transactions`) holds.

    Raises:
        ConfigError: the table is empty.
    """
    if frame.empty:
        raise ConfigError("the data file holds no transaction: simulate one (fraudstream simulate)")
    times = frame["TX_DATETIME"]
    return FileDays(times.min().date(), times.max().date())


def _date(text: str, option: str, days: FileDays) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{option} must be an ISO date such as {days.last}, got {text!r}"
        ) from None


@dataclass(frozen=True)
class TrainPeriods:
    """``fraudstream train``'s layout: validation, training ending on ``train_end``, the
    delay, then the test days."""

    train_end: str
    train_days: int


def train_periods(
    days: FileDays,
    train_end: str,
    train_days: int,
    valid_days: int,
    test_days: int,
    *,
    given_end: bool,
    given_days: bool,
) -> TrainPeriods:
    """The training layout inside ``days``; derived where an option was left to default.

    >>> file = FileDays(dt.date(2018, 4, 1), dt.date(2018, 5, 30))
    >>> train_periods(file, "2018-08-21", 56, 7, 7, given_end=False, given_days=False)
    TrainPeriods(train_end='2018-05-16', train_days=39)

    Raises:
        ConfigError: naming the option to change and a value that fits the file.
    """
    after = DELAY_DAYS + test_days  # days needed after the last training day
    latest_end = days.last - dt.timedelta(days=after)
    end = _date(train_end, "--train-end", days)
    if end > latest_end or end < days.first:
        if given_end:
            raise ConfigError(
                f"--train-end {end} leaves no room in the file ({days.label}) for the "
                f"{DELAY_DAYS}-day delay and --test-days {test_days}: use --train-end "
                f"{latest_end} or earlier"
            )
        end = latest_end
    room = (end - days.first).days + 1 - valid_days  # days left for training
    if room < 1:
        raise ConfigError(
            f"the file ({days.label}) is too short for --valid-days {valid_days}, a training "
            f"day, the {DELAY_DAYS}-day delay and --test-days {test_days}: use a longer "
            f"file (fraudstream simulate --n-days), or fewer days, e.g. --valid-days "
            f"{max(1, valid_days // 2)} --test-days {max(1, test_days // 2)}"
        )
    if train_days > room:
        if given_days:
            raise ConfigError(
                f"--train-days {train_days} with --valid-days {valid_days} before --train-end "
                f"{end} starts before the file ({days.label}): use --train-days {room} or "
                "fewer"
            )
        train_days = room
    return TrainPeriods(end.isoformat(), train_days)


@dataclass(frozen=True)
class EvaluatePeriods:
    """``fraudstream evaluate``'s layout: the latest fold's first training day, the number
    of folds and the single split's first training day."""

    start: str
    folds: int
    single_split_start: str


def evaluate_periods(
    days: FileDays,
    start: str,
    folds: int,
    single_split_start: str,
    delta_train: int,
    delta_delay: int,
    delta_test: int,
    *,
    given: set[str],
) -> EvaluatePeriods:
    """The protocol's folds inside ``days``; derived where an option was left to default.

    Each fold needs ``delta_train`` validation days before its training days (the LSTM's
    early stopping), then training, delay and test days.

    >>> file = FileDays(dt.date(2018, 4, 1), dt.date(2018, 5, 30))
    >>> evaluate_periods(file, "2018-08-15", 4, "2018-07-25", 7, 7, 7, given=set())
    EvaluatePeriods(start='2018-05-10', folds=4, single_split_start='2018-04-19')

    Raises:
        ConfigError: naming the option to change and a value that fits the file.
    """
    span = delta_train + delta_delay + delta_test  # one fold, from training to test
    latest = days.last - dt.timedelta(days=span - 1)
    # A given period need only lie in the file; a derived one also leaves the LSTM's
    # validation days (as many as the training days) before each fold.
    inside = days.first
    roomy = days.first + dt.timedelta(days=delta_train)
    if latest < roomy:
        raise ConfigError(
            f"the file ({days.label}) is too short for one fold of --delta-train "
            f"{delta_train} (and as many validation days), --delta-delay {delta_delay} and "
            f"--delta-test {delta_test}: use a longer file (fraudstream simulate --n-days) or "
            f"shorter periods, e.g. --delta-train {max(1, delta_train // 2)} --delta-test "
            f"{max(1, delta_test // 2)}"
        )
    first_fold = _date(start, "--start", days)
    if not inside <= first_fold <= latest:
        if "start" in given:
            raise ConfigError(
                f"--start {first_fold} puts the latest fold outside the file ({days.label}): "
                f"use a day from {roomy} to {latest}, e.g. --start {latest}"
            )
        first_fold = latest
    earliest = inside if "folds" in given else roomy
    fit = max(0, (first_fold - earliest).days) // delta_test + 1  # folds that fit
    if folds > fit:
        if "folds" in given:
            raise ConfigError(
                f"--folds {folds} {delta_test} days apart from --start {first_fold} start "
                f"before the file ({days.label}): use --folds {fit} or fewer"
            )
        folds = fit
    single = _date(single_split_start, "--single-split-start", days)
    if not inside <= single <= latest:
        if "single_split_start" in given:
            raise ConfigError(
                f"--single-split-start {single} is outside the file ({days.label}): use a "
                f"day from {roomy} to {latest}, e.g. --single-split-start {roomy}"
            )
        single = first_fold - dt.timedelta(days=(folds - 1) * delta_test)
    return EvaluatePeriods(first_fold.isoformat(), folds, single.isoformat())
