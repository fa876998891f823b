"""The Fraud Detection Handbook's assessment protocol: splits, test sets and metrics.

Le Borgne et al., *Reproducible Machine Learning for Credit Card Fraud Detection*, chapters
3 to 5:

* **split**: a training period, then a delay period (labels not known yet, unused), then a
  test period; each 7 days by default. The test set drops the cards already known to be
  compromised (:func:`training.dataset.known_compromised`).
* **prequential**: ``n_folds`` splits whose training periods start ``start``, ``start - 7``,
  ``start - 14``, ... days; results are reported as the mean and standard deviation over
  folds. With the defaults the test folds train from 2018-08-15, 08-08, 08-01 and 07-25 (the
  Handbook's ``start_date_training_for_test``).
* **metrics**: AUC ROC and average precision over test transactions, and the card precision
  top-k of :func:`card_precision_top_k`.

:func:`run_fold` trains every model of a comparison on one split and scores its test set:
the sequence scorers of each chosen family (:data:`~training.families.FAMILIES`: the LSTM by
default; early-stopped on the week before its training days, see :func:`training_window`:
those labels are older than the training labels, so known whenever they are, and the test
set plays no part in model choice),
the reference baselines on the 15 baseline features, and two *oracle bounds* that use the
simulator's ground truth to show what the data allows (see :func:`oracle_scores`): what any
model of our features can reach (:data:`ORACLE`), and what any model at all can reach under
the protocol's 7-day label delay (:data:`ORACLE_LABEL_DELAY`).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score

from stream_app import features
from stream_app.errors import ConfigError
from training.baselines import BASELINE_NAMES, fit_and_score
from training.dataset import (
    FileFeatures,
    IntArray,
    Period,
    SequenceSet,
    epoch_day,
    known_compromised,
)
from training.families import FAMILIES, Family
from training.sequence_model import predict
from training.serving_cost import onnx_us_per_event
from training.train import AugmentConfig, EpochLog, FitResult, TrainConfig, fit_sequence_model

FloatArray = npt.NDArray[np.float64]

SINGLE_SPLIT_START: Final = "2018-07-25"
PREQUENTIAL_START: Final = "2018-08-15"
N_FOLDS: Final = 4
DELTA_DAYS: Final = 7
TOP_K: Final = 100
METRIC_NAMES: Final = ("auc_roc", "average_precision", "card_precision_at_100")


@dataclass(frozen=True)
class Split:
    """One training / delay / test layout, in whole days."""

    train: Period
    delay_days: int
    test: Period

    @classmethod
    def starting(
        cls,
        train_start: dt.date | str,
        delta_train: int = DELTA_DAYS,
        delta_delay: int = DELTA_DAYS,
        delta_test: int = DELTA_DAYS,
    ) -> Split:
        """The Handbook's ``get_train_test_set`` layout from the first training day.

        >>> s = Split.starting("2018-07-25")
        >>> s.train.label, s.test.label
        ('2018-07-25..2018-07-31', '2018-08-08..2018-08-14')
        """
        train = Period.starting(train_start, delta_train)
        first_test = train.last_day + 1 + delta_delay
        return cls(train, delta_delay, Period(first_test, first_test + delta_test - 1))

    @property
    def delay(self) -> Period | None:
        """The delay period (``None`` when it is empty)."""
        if self.delay_days == 0:
            return None
        return Period(self.train.last_day + 1, self.train.last_day + self.delay_days)

    def describe(self) -> dict[str, str]:
        """ISO ranges of each period (for reports and the model card)."""
        delay = self.delay
        return {
            "train": self.train.label,
            "delay": delay.label if delay else "",
            "test": self.test.label,
        }


def prequential_splits(
    start: dt.date | str = PREQUENTIAL_START,
    n_folds: int = N_FOLDS,
    delta_train: int = DELTA_DAYS,
    delta_delay: int = DELTA_DAYS,
    delta_assessment: int = DELTA_DAYS,
) -> list[Split]:
    """The Handbook's ``prequentialSplit``: fold ``i`` starts ``i * delta_assessment`` days
    before ``start``.

    >>> [s.train.label[:10] for s in prequential_splits()]
    ['2018-08-15', '2018-08-08', '2018-08-01', '2018-07-25']
    """
    first = epoch_day(start)
    return [
        Split.starting(
            dt.date(1970, 1, 1) + dt.timedelta(days=first - fold * delta_assessment),
            delta_train,
            delta_delay,
            delta_assessment,
        )
        for fold in range(n_folds)
    ]


def assessment_rows(data: FileFeatures, split: Split) -> IntArray:
    """The split's test rows, cards already known to be compromised removed."""
    rows = data.rows(split.test)
    known = known_compromised(
        data.days, data.customers, data.labels, rows, split.train.first_day, split.delay_days
    )
    return rows[~known]


@dataclass(frozen=True)
class CardPrecision:
    """Card precision top-k per test day (days in ascending order) and its mean."""

    days: list[int]
    per_day: list[float]
    fraud_cards_per_day: list[int]
    mean: float


def card_precision_top_k(
    days: IntArray,
    cards: IntArray,
    labels: IntArray,
    scores: FloatArray,
    top_k: int = TOP_K,
    remove_detected: bool = True,
) -> CardPrecision:
    """The Handbook's ``card_precision_top_k``: per day, the share of frauds among the ``k``
    cards with the highest maximum score, averaged over days.

    A card's score on a day is its highest transaction score, and it counts as fraudulent if
    any of its transactions that day is. Cards found fraudulent in an earlier day's top ``k``
    are removed from later days (``remove_detected``). The count is divided by ``k`` even on a
    day with fewer cards. Ties in score are ordered by card id (the reference leaves them to
    an unstable sort).

    >>> days = np.array([0, 0, 0, 1, 1, 1])
    >>> cards = np.array([1, 2, 3, 1, 2, 3])
    >>> fraud = np.array([1, 0, 0, 1, 0, 1])
    >>> score = np.array([0.9, 0.8, 0.1, 0.9, 0.8, 0.1])
    >>> card_precision_top_k(days, cards, fraud, score, top_k=1).per_day
    [1.0, 0.0]
    """
    detected: set[int] = set()
    kept_days: list[int] = []
    per_day: list[float] = []
    fraud_cards: list[int] = []
    for day in np.unique(days).tolist():
        on_day = days == day
        if detected:
            on_day &= ~np.isin(cards, np.fromiter(detected, dtype=np.int64))
        day_cards = cards[on_day]
        unique_cards, inverse = np.unique(day_cards, return_inverse=True)
        card_score = np.full(len(unique_cards), -np.inf)
        np.maximum.at(card_score, inverse, scores[on_day])
        card_fraud = np.zeros(len(unique_cards), dtype=np.int64)
        np.maximum.at(card_fraud, inverse, labels[on_day])
        # unique_cards is ascending, so a stable sort on -score breaks ties by card id.
        top = np.argsort(-card_score, kind="stable")[:top_k]
        hits = top[card_fraud[top] == 1]
        kept_days.append(int(day))
        per_day.append(len(hits) / top_k)
        fraud_cards.append(int(card_fraud.sum()))
        if remove_detected:
            detected.update(int(c) for c in unique_cards[hits])
    mean = float(np.mean(per_day)) if per_day else float("nan")
    return CardPrecision(kept_days, per_day, fraud_cards, mean)


def assess(
    days: IntArray,
    cards: IntArray,
    labels: IntArray,
    scores: FloatArray,
    top_k: int = TOP_K,
) -> dict[str, float]:
    """AUC ROC, average precision and card precision@k of one model on one test set.

    >>> m = assess(np.array([0, 0, 0]), np.array([1, 2, 3]), np.array([0, 1, 0]),
    ...            np.array([0.1, 0.9, 0.2]), top_k=1)
    >>> {name: round(value, 3) for name, value in m.items()}
    {'auc_roc': 1.0, 'average_precision': 1.0, 'card_precision_at_1': 1.0}
    """
    cp = card_precision_top_k(days, cards, labels, scores, top_k)
    return {
        "auc_roc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        f"card_precision_at_{top_k}": cp.mean,
    }


def mean_and_std(results: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric, the mean and (population) standard deviation over folds.

    >>> mean_and_std([{"auc_roc": 0.5}, {"auc_roc": 1.0}])["auc_roc"]
    {'mean': 0.75, 'std': 0.25}
    """
    names = [name for name in METRIC_NAMES if all(name in r for r in results)]
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        values = np.array([r[name] for r in results], dtype=np.float64)
        summary[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return summary


LSTM: Final = str(Family.LSTM)
# The bound for our features: their terminal windows end on the last whole hour more than
# the 7-day label delay back (hour H - 169 for a transaction in hour H).
ORACLE: Final = "oracle"
# The bound for any model under the protocol's 7-day label delay: a fraud is known exactly
# 7 x 24 h after it happened, the most any features can know (the Handbook's exact-time
# windows reach it).
ORACLE_LABEL_DELAY: Final = "oracle_label_delay"
# What each oracle bound sees, as (time cell in ms, how many cells back a fraud must lie to
# be known): see :func:`undetectable_frauds`.
ORACLE_KNOWN_AFTER: Final = {
    ORACLE: (features.MS_PER_HOUR, -features.terminal_window_hours()[0][1]),
    ORACLE_LABEL_DELAY: (1, features.LABEL_DELAY_DAYS * features.MS_PER_DAY),
}
_MODEL_NAME = re.compile(r"^(?P<kind>[a-z_]+?)(?:_(?P<days>\d+)d)?$")
_COMPROMISED_TERMINAL: Final = 2  # simulator scenario: every transaction of a terminal is fraud
COMPROMISE_DAYS: Final = 28  # SimulatorConfig.terminal_compromise_days


def undetectable_frauds(
    data: FileFeatures,
    rows: IntArray,
    known_after: tuple[int, int] = ORACLE_KNOWN_AFTER[ORACLE],
    compromise_days: int = COMPROMISE_DAYS,
) -> npt.NDArray[np.bool_]:
    """Which rows are frauds that no model of these features can tell from genuine ones.

    A fraud of the compromised-terminal scenario at time ``t`` shows only once a fraud of the
    same compromise is known: one on the same terminal less than ``compromise_days`` before
    ``t`` (the compromise can have started no earlier) whose time cell lies at least ``lag``
    cells before ``t``'s, with ``known_after = (cell_ms, lag)``. Until then nothing in any
    feature differs from a genuine transaction. Reads the simulator's ``TX_FRAUD_SCENARIO``.

    The default is our features' (whole hours, 169 back); ``(1, 7 days in ms)`` is exact time,
    the most any model can know under the 7-day label delay (:data:`ORACLE_KNOWN_AFTER`).
    """
    cell_ms, lag = known_after
    scenario_2 = np.flatnonzero(data.scenarios == _COMPROMISED_TERMINAL)
    cells = data.times_ms // cell_ms
    reach = compromise_days * features.MS_PER_DAY // cell_ms
    # One sorted key per (terminal, cell), cells shifted so that a look-back never reaches
    # the previous terminal's keys.
    span = int(cells.max()) + reach + 1
    known = np.sort(data.terminals[scenario_2] * span + cells[scenario_2] + reach)
    key = data.terminals[rows] * span + cells[rows] + reach
    earlier = np.searchsorted(known, key - lag, side="right") - np.searchsorted(
        known, key - reach + 1, side="left"
    )
    hidden: npt.NDArray[np.bool_] = (data.scenarios[rows] == _COMPROMISED_TERMINAL) & (earlier == 0)
    return hidden


def oracle_scores(
    data: FileFeatures,
    rows: IntArray,
    seed: int = 0,
    known_after: tuple[int, int] = ORACLE_KNOWN_AFTER[ORACLE],
) -> FloatArray:
    """Scores of an oracle that ranks every detectable fraud above everything else and the
    :func:`undetectable_frauds` at random among the genuine transactions: an upper bound in
    expectation, not a model. By default it bounds any model of these features; with exact
    time (:data:`ORACLE_LABEL_DELAY`) any model under the 7-day label delay.
    """
    rng = np.random.default_rng(seed)
    detectable = (data.labels[rows] == 1) & ~undetectable_frauds(data, rows, known_after)
    scores: FloatArray = (rng.random(len(rows)) + detectable) / 2.0
    return scores


MODEL_KINDS: Final = (*FAMILIES, *BASELINE_NAMES, *ORACLE_KNOWN_AFTER)


def check_models(names: Sequence[str]) -> tuple[str, ...]:
    """The model names, each a :data:`MODEL_KINDS` kind with an optional history; else a
    :class:`ConfigError` that lists the kinds.

    >>> check_models(["xgboost", "lstm_28d"])
    ('xgboost', 'lstm_28d')
    """
    for name in names:
        try:
            kind, _ = parse_model_name(name)
        except ValueError:
            kind = ""
        if kind not in MODEL_KINDS:
            raise ConfigError(
                f"unknown model {name!r}: choose among {', '.join(MODEL_KINDS)}, optionally "
                "with a number of training days (lstm_28d)"
            )
    return tuple(names)


def model_name(kind: str, history_days: int | None = None) -> str:
    """A model's name in reports: its kind, with ``_<n>d`` when it trains on ``n`` days
    instead of the protocol's training period.

    >>> model_name("xgboost"), model_name("lstm", 28)
    ('xgboost', 'lstm_28d')
    """
    return kind if history_days is None else f"{kind}_{history_days}d"


def parse_model_name(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`model_name`.

    >>> parse_model_name("logistic_regression_14d")
    ('logistic_regression', 14)
    """
    match = _MODEL_NAME.match(name)
    if match is None:
        raise ValueError(f"not a model name: {name!r}")
    days = match.group("days")
    return match.group("kind"), int(days) if days else None


@dataclass(frozen=True)
class ProtocolSettings:
    """What a comparison trains on every split.

    ``models`` names kinds (:data:`MODEL_KINDS`: :data:`LSTM`, the :data:`BASELINE_NAMES`, the
    oracle bounds :data:`ORACLE` and :data:`ORACLE_LABEL_DELAY`), each
    optionally with a training history (``lstm_28d``: the 28 days ending with the split's
    training period); without one a model trains on the training period, as the protocol
    has it. The LSTM stops early on the ``valid_days`` just before its training days.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    models: tuple[str, ...] = (LSTM, *BASELINE_NAMES, ORACLE, ORACLE_LABEL_DELAY)
    valid_days: int = DELTA_DAYS
    top_k: int = TOP_K
    # Time each family's ONNX graph on the test sequences (training.serving_cost).
    serving_cost: bool = True


@dataclass(frozen=True)
class ModelRun:
    """One model's test scores and metrics on one split (and, for the LSTM, the model)."""

    name: str
    scores: FloatArray
    metrics: dict[str, float]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    fit: FitResult | None = None
    valid: SequenceSet | None = None


@dataclass(frozen=True)
class FoldResult:
    """Every model of a comparison on one split."""

    split: Split
    test_labels: IntArray
    runs: dict[str, ModelRun]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the fold (without per-transaction scores)."""
        return {
            "periods": self.split.describe(),
            "test_transactions": len(self.test_labels),
            "test_frauds": int(self.test_labels.sum()),
            "metrics": {name: run.metrics for name, run in self.runs.items()},
            "seconds": {name: round(run.seconds, 2) for name, run in self.runs.items()},
            "details": {name: run.details for name, run in self.runs.items() if run.details},
        }


def training_window(
    split: Split, history_days: int | None, valid_days: int
) -> tuple[Period, Period]:
    """A model's training days (ending with the split's training period) and, just before
    them, its validation days.

    >>> train, valid = training_window(Split.starting("2018-07-25"), 14, 7)
    >>> train.label, valid.label
    ('2018-07-18..2018-07-31', '2018-07-11..2018-07-17')
    """
    days = split.train.days if history_days is None else history_days
    train = Period(split.train.last_day - days + 1, split.train.last_day)
    return train, Period(train.first_day - valid_days, train.first_day - 1)


def run_fold(
    data: FileFeatures,
    split: Split,
    settings: ProtocolSettings,
    on_epoch: Callable[[str, EpochLog], None] | None = None,
) -> FoldResult:
    """Train every model of ``settings.models`` on one split and assess it on the test set.

    A test period outside the file gives empty scores and no metrics (the ``train``
    command's model may be trained up to the file's end). ``on_epoch`` receives the model's
    name with each LSTM epoch.
    """
    test = assessment_rows(data, split)
    days, cards, labels = data.days[test], data.customers[test], data.labels[test]
    gradable = len(test) > 0 and 0 < labels.sum() < len(test)
    runs: dict[str, ModelRun] = {}
    for name in settings.models:
        kind, history = parse_model_name(name)
        window, valid_period = training_window(split, history, settings.valid_days)
        started = time.perf_counter()
        details: dict[str, Any] = {"train_days": window.label}
        fit: FitResult | None = None
        valid: SequenceSet | None = None
        rows = data.require(window, "training")
        details.update(train_transactions=len(rows), train_frauds=int(data.labels[rows].sum()))
        if kind in FAMILIES:
            t = settings.train.sequence_length
            valid = data.sequence_set(data.require(valid_period, "validation"), t)
            callback = None if on_epoch is None else partial(on_epoch, name)
            family = replace(settings.train.model, family=kind)
            fit = fit_sequence_model(
                data.sequence_set(rows, t),
                valid,
                replace(settings.train, model=family),
                settings.augment,
                callback,
            )
            test_sequences = data.offline.sequences(t, test)
            scores = predict(fit.trained.model, test_sequences)
            details.update(fit.describe(), validation_days=valid_period.label)
            if settings.serving_cost and len(test_sequences):
                cost = onnx_us_per_event(fit.trained.model, test_sequences)
                details["onnx_us_per_event"] = cost
        elif kind in ORACLE_KNOWN_AFTER:
            known_after = ORACLE_KNOWN_AFTER[kind]
            scores = oracle_scores(data, test, known_after=known_after)
            hidden = int(undetectable_frauds(data, test, known_after).sum())
            details.update(undetectable_frauds=hidden, test_frauds=int(labels.sum()))
        elif kind in BASELINE_NAMES:
            scores = fit_and_score(
                kind,
                data.baseline(rows),
                data.labels[rows],
                data.baseline(test),
                settings.train.threads,
            ).scores
        else:
            raise ConfigError(f"unknown model {name!r}")
        runs[name] = ModelRun(
            name=name,
            scores=scores,
            metrics=assess(days, cards, labels, scores, settings.top_k) if gradable else {},
            seconds=time.perf_counter() - started,
            details=details,
            fit=fit,
            valid=valid,
        )
    return FoldResult(split=split, test_labels=labels, runs=runs)


def summarise_folds(folds: Sequence[FoldResult]) -> dict[str, dict[str, dict[str, float]]]:
    """Per model, the mean and standard deviation of each metric over folds."""
    names = folds[0].runs.keys() if folds else []
    return {name: mean_and_std([fold.runs[name].metrics for fold in folds]) for name in names}
