"""Threshold choice (training/thresholds.py): the alert budget and the decline precision."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stream_app.records import Decision
from stream_app.scoring.decisions import decide
from training.thresholds import choose_thresholds, decline_threshold, review_threshold


def _validation(
    seed: int = 0, days: int = 7, cards: int = 3000, per_card: int = 3
) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    n = days * cards * per_card
    day = np.repeat(np.arange(days), cards * per_card)
    card = np.tile(np.repeat(np.arange(cards), per_card), days)
    labels = (rng.random(n) < 0.01).astype(np.int64)
    scores = 0.45 * labels + 0.5 * rng.random(n)
    return day.astype(np.int64), card.astype(np.int64), labels, scores


@pytest.mark.parametrize("budget", [10, 100, 250])
def test_review_threshold_lets_about_the_budget_of_cards_through_a_day(budget: int) -> None:
    days, cards, _, scores = _validation()
    threshold, reached = review_threshold(days, cards, scores, budget)
    per_day = [len(np.unique(cards[(days == d) & (scores >= threshold)])) for d in np.unique(days)]
    assert np.mean(per_day) == pytest.approx(budget, abs=0.5)
    assert reached == pytest.approx(np.mean(per_day))


def test_review_threshold_counts_cards_not_transactions() -> None:
    # One card with many high scores uses one unit of the budget.
    days = np.zeros(6, dtype=np.int64)
    cards = np.array([1, 1, 1, 1, 2, 3])
    scores = np.array([0.9, 0.95, 0.97, 0.99, 0.5, 0.4])
    threshold, reached = review_threshold(days, cards, scores, 2)
    assert threshold == 0.5 and reached == 2.0


def test_decline_threshold_reaches_the_precision() -> None:
    _, _, labels, scores = _validation()
    threshold, precision, declined = decline_threshold(labels, scores, 0.9)
    assert precision is not None and precision >= 0.9
    chosen = scores >= threshold
    assert chosen.sum() == declined
    assert labels[chosen].mean() == pytest.approx(precision)
    # The lowest such cut-off: one step lower (more declined) is below the precision.
    lower = scores[scores < threshold].max()
    assert labels[scores >= lower].mean() < 0.9


def test_decline_is_off_when_no_cut_off_is_precise_enough() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(2000) < 0.05).astype(np.int64)
    threshold, precision, declined = decline_threshold(labels, rng.random(2000), 0.9)
    assert (threshold, precision, declined) == (1.0, None, 0)


def test_decline_ignores_tiny_declined_sets() -> None:
    # The top 5 are all frauds, but 5 transactions are too few to promise 90 %.
    labels = np.r_[np.ones(5), np.zeros(95)].astype(np.int64)
    scores = np.linspace(1.0, 0.0, 100)
    assert decline_threshold(labels, scores, 0.9, min_declined=20)[1] is None
    assert decline_threshold(labels, scores, 0.9, min_declined=5)[2] == 5


def test_choose_thresholds_orders_them_and_writes_the_rules() -> None:
    days, cards, labels, scores = _validation()
    choice = choose_thresholds(days, cards, labels, scores, "2018-08-01..2018-08-07")
    t = choice.thresholds
    assert 0.0 <= t.review <= t.decline <= 1.0
    assert "2018-08-01..2018-08-07" in t.review_rule and "100" in t.review_rule
    assert "0.9" in t.decline_rule
    decisions = decide(scores, t)
    declined = np.array([d == Decision.DECLINE for d in decisions])
    assert labels[declined].mean() >= 0.9
