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
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score

from training.dataset import FileFeatures, IntArray, Period, epoch_day, known_compromised

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

    @property
    def validation(self) -> Period:
        """The week before the training period, the LSTM's early-stopping set.

        Its labels are older than the training period's, so they are known whenever the
        training labels are; the test set is untouched by model choice.
        """
        return self.train.shifted(-self.train.days)

    def describe(self) -> dict[str, str]:
        """ISO ranges of each period (for reports and the model card)."""
        delay = self.delay
        return {
            "validation": self.validation.label,
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


def test_rows(data: FileFeatures, split: Split) -> IntArray:
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
