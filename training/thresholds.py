"""Choosing the model card's decision thresholds on validation scores.

* ``review``: an alert budget. Investigators can look at about ``cards_per_day`` cards a day,
  so the threshold is the score that about that many distinct cards reach per day on the
  validation period (a card reaches it on a day if any of its transactions does).
* ``decline``: the lowest score at which the declined transactions of the validation period
  are at least ``min_precision`` frauds, counted over enough transactions to mean something.

Both rules are written out in the card (``review_rule``, ``decline_rule``) with the figures
measured, so an operator reading the card knows what the numbers promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_app.models.card import Thresholds

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_CARDS_PER_DAY: Final = 100
DEFAULT_MIN_PRECISION: Final = 0.9
# Below this many declined transactions a precision is too noisy to promise anything.
MIN_DECLINED: Final = 20


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen thresholds and what they did on the validation period."""

    thresholds: Thresholds
    review_cards_per_day: float
    decline_precision: float | None
    decline_transactions: int


def review_threshold(
    days: IntArray, cards: IntArray, scores: FloatArray, cards_per_day: float
) -> tuple[float, float]:
    """The score that about ``cards_per_day`` distinct cards a day reach on average.

    Returns ``(threshold, cards per day at or above it)``.

    >>> days = np.array([0, 0, 0, 1, 1, 1])
    >>> cards = np.array([1, 1, 2, 1, 2, 3])
    >>> scores = np.array([0.9, 0.95, 0.5, 0.2, 0.8, 0.4])
    >>> review_threshold(days, cards, scores, 1)
    (0.8, 1.0)
    """
    keys = np.unique(np.stack([days, cards]), axis=1, return_inverse=True)[1].reshape(-1)
    best = np.full(int(keys.max()) + 1, -np.inf)
    np.maximum.at(best, keys, scores)
    n_days = len(np.unique(days))
    ranked = np.sort(best)[::-1]
    k = max(1, min(len(ranked), round(cards_per_day * n_days)))
    threshold = float(ranked[k - 1])
    reached = float(np.count_nonzero(best >= threshold)) / n_days
    return threshold, reached


def decline_threshold(
    labels: IntArray, scores: FloatArray, min_precision: float, min_declined: int = MIN_DECLINED
) -> tuple[float, float | None, int]:
    """The lowest score whose declined set (scores at or above it) has the wanted precision.

    Only cut-offs that decline at least ``min_declined`` transactions are considered. When no
    cut-off qualifies the threshold is 1.0 (nothing above it is likely to occur) and the
    precision is ``None``.

    Returns ``(threshold, precision, transactions declined)``.

    >>> labels = np.array([0] * 30 + [1] * 30)
    >>> scores = np.r_[np.linspace(0, 0.5, 30), np.linspace(0.45, 1, 30)]
    >>> t, p, n = decline_threshold(labels, scores, 0.9)
    >>> round(t, 3), round(p, 3), n
    (0.45, 0.909, 33)
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    hits = np.cumsum(labels[order])
    declined = np.arange(1, len(scores) + 1)
    # A cut-off must sit at the end of a run of equal scores: ties are declined together.
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]
    precision = hits / declined
    ok = last_of_tie & (declined >= min_declined) & (precision >= min_precision)
    if not ok.any():
        return 1.0, None, 0
    i = int(np.flatnonzero(ok)[-1])
    return float(ranked[i]), float(precision[i]), int(declined[i])


def choose_thresholds(
    days: IntArray,
    cards: IntArray,
    labels: IntArray,
    scores: FloatArray,
    period: str,
    cards_per_day: float = DEFAULT_CARDS_PER_DAY,
    min_precision: float = DEFAULT_MIN_PRECISION,
) -> ThresholdChoice:
    """Both thresholds from validation scores, with their rule texts."""
    review, reached = review_threshold(days, cards, scores, cards_per_day)
    decline, precision, declined = decline_threshold(labels, scores, min_precision)
    # The review band must not be empty-negative: decline never sits below review.
    decline = max(decline, review)
    review_rule = (
        f"alert budget: score >= {review:.6g} is reached by {reached:.1f} distinct cards a day "
        f"on the validation period {period} (target about {cards_per_day:g} cards a day)"
    )
    if precision is None:
        decline_rule = (
            f"no score reached a transaction precision of {min_precision:g} over at least "
            f"{MIN_DECLINED} transactions on the validation period {period}; decline is off"
        )
    else:
        decline_rule = (
            f"precision: transactions scoring >= {decline:.6g} were {precision:.1%} frauds "
            f"({declined} transactions) on the validation period {period} "
            f"(target precision >= {min_precision:g})"
        )
    return ThresholdChoice(
        thresholds=Thresholds(
            review=review, decline=decline, review_rule=review_rule, decline_rule=decline_rule
        ),
        review_cards_per_day=reached,
        decline_precision=precision,
        decline_transactions=declined,
    )
