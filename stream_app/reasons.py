"""Plain-words reasons for alerts: which features drove a score, by occlusion.

For each alerted event and each :data:`FEATURE_GROUPS` group, the group's values in the
current (last) step of the sequence are replaced by the model card's normalisation mean,
i.e. by an unremarkable transaction, and the variants of all alerts are rescored in ONE
extra model call. A group's contribution is the drop in log-odds its occlusion causes (in
log-odds rather than probability so that a score saturated near 1 by two signals, each
enough alone, still shows both); the largest positive ones are phrased with the event's
actual values, e.g. "amount 512.30 is 5.1x the customer's 30-day average (100)".
Phrases follow how an analyst writes: singular for one ("1 known fraud"), only facts
that point towards fraud (never "0 known frauds"), the amount said once with all its
comparisons, averages and ratios rounded ("100", "18x").

Occlusion is model-agnostic and cheap (alerts are rare, one call per batch), and its
answer is exactly the question an analyst asks: what would the score be had this looked
normal? Groups, not single features, are occluded because features within a group move
together (an amount and its log); occluding one would leave its twin to carry the signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_app import features as F
from stream_app.records import MAX_REASON_LENGTH

ScoreFunction = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]

# Contributions below this (log-odds; about a point of probability at a score of 0.2) are
# noise, not a reason.
MIN_CONTRIBUTION: Final = 0.05
# Probabilities are clipped this far from 0 and 1 before their log-odds are taken.
_EPS: Final = 1e-7
_SHORT_GAP_S: Final = 600.0  # a previous transaction closer than this is worth saying


@dataclass(frozen=True)
class FeatureGroup:
    """Features occluded together, with the name reasons are grouped under."""

    name: str
    features: tuple[str, ...]

    @property
    def index(self) -> npt.NDArray[np.int64]:
        """Column of each feature in :data:`stream_app.features.FEATURE_NAMES`."""
        return np.array([F.FEATURE_INDEX[name] for name in self.features], dtype=np.int64)


FEATURE_GROUPS: Final[tuple[FeatureGroup, ...]] = (
    FeatureGroup("amount", ("TX_AMOUNT", "LOG_TX_AMOUNT")),
    FeatureGroup(
        "amount_vs_usual",
        (
            "AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY",
            *(f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW" for w in F.CUSTOMER_WINDOWS_DAYS),
        ),
    ),
    FeatureGroup(
        "terminal_risk",
        tuple(
            name
            for w in F.TERMINAL_WINDOWS_DAYS
            for name in (f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW", f"TERMINAL_ID_RISK_{w}DAY_WINDOW")
        ),
    ),
    FeatureGroup(
        "velocity",
        (
            *(f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW" for w in F.CUSTOMER_WINDOWS_DAYS),
            "LOG_SECONDS_SINCE_PREV_TX",
        ),
    ),
    FeatureGroup(
        "time_of_day",
        ("TX_DURING_NIGHT", "TX_DURING_WEEKEND", "TX_HOUR_SIN", "TX_HOUR_COS"),
    ),
)


@dataclass(frozen=True)
class AlertContext:
    """What the phrases quote about one alerted event."""

    score: float
    amount: float
    time_ms: int
    features: npt.NDArray[np.float64]  # the current step's raw feature vector


def _f(context: AlertContext, name: str) -> float:
    return float(context.features[F.FEATURE_INDEX[name]])


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun, singular for exactly one.

    >>> plural(1, "known fraud"), plural(3, "day"), plural(0, "transaction")
    ('1 known fraud', '3 days', '0 transactions')
    """
    return f"{n:,} {noun if n == 1 else (nouns or noun + 's')}"


def money(value: float) -> str:
    """An amount as an analyst writes it: cents below 100, whole units from 100 up.

    >>> money(9.5), money(100.45), money(1234.5)
    ('9.50', '100', '1,234')
    """
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def times(ratio: float) -> str:
    """A ratio as "2.5x" below ten and "18x" from ten up; no trailing ".0".

    >>> times(5.1), times(3.0), times(18.04)
    ('5.1x', '3x', '18x')
    """
    text = f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"
    return text.removesuffix(".0") + "x"


def _duration(seconds: float) -> str:
    """ "45 s", "3 min" (whole minutes from one minute up)."""
    if seconds < 60:
        return f"{max(seconds, 0):.0f} s"
    return f"{seconds / 60:.0f} min"


# A fact is worth saying only when it points towards fraud: the amount well above the
# usual, a terminal that did see frauds, more transactions than usual, a night or weekend.
_UNUSUAL_RATIO: Final = 1.5


def _amount(context: AlertContext, mean: npt.NDArray[np.float64]) -> str | None:
    typical = float(mean[F.FEATURE_INDEX["TX_AMOUNT"]])
    if typical <= 0 or context.amount < _UNUSUAL_RATIO * typical:
        return None
    return f"{times(context.amount / typical)} the average transaction ({money(typical)})"


def _amount_vs_usual(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str | None:
    n30 = _f(context, "CUSTOMER_ID_NB_TX_30DAY_WINDOW")
    ratio = _f(context, "AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY")
    if n30 <= 1 or ratio <= 0:
        return "the customer's first in 30 days"
    if ratio < _UNUSUAL_RATIO:
        return None
    prior = context.amount / ratio
    return f"{times(ratio)} the customer's 30-day average ({money(prior)})"


def _terminal_risk(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str | None:
    windows = F.TERMINAL_WINDOWS_DAYS
    risks = [_f(context, f"TERMINAL_ID_RISK_{w}DAY_WINDOW") for w in windows]
    if max(risks) <= 0:
        return None  # a terminal without known frauds is no reason for an alert
    w = windows[int(np.argmax(risks))]
    n = round(_f(context, f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"))
    frauds = round(risks[windows.index(w)] * n)
    if n == 0 or frauds == 0:
        return None
    return (
        f"terminal had {plural(frauds, 'known fraud')} in {plural(n, 'transaction')} "
        f"over {plural(w, 'day')}"
    )


def _velocity(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str | None:
    gap_s = math.expm1(_f(context, "LOG_SECONDS_SINCE_PREV_TX"))
    n1 = round(_f(context, "CUSTOMER_ID_NB_TX_1DAY_WINDOW"))
    daily = _f(context, "CUSTOMER_ID_NB_TX_30DAY_WINDOW") / 30
    usual = f"{daily:.1f}".removesuffix(".0")
    if n1 > 1 and gap_s < _SHORT_GAP_S:
        return (
            f"{_duration(gap_s)} after the customer's previous transaction, "
            f"{n1} in 24 hours (usually {usual} a day)"
        )
    if n1 < 2 or n1 < _UNUSUAL_RATIO * daily:
        return None
    return f"{plural(n1, 'transaction')} by the customer in 24 hours (usually {usual} a day)"


def _time_of_day(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str | None:
    night = _f(context, "TX_DURING_NIGHT") > 0
    weekend = _f(context, "TX_DURING_WEEKEND") > 0
    if not (night or weekend):
        return None
    moment = datetime.fromtimestamp(context.time_ms / 1000, UTC)
    when = " ".join(
        part for part in ("at night" if night else "", "on a weekend" if weekend else "") if part
    )
    return f"made {when} ({moment:%a %H:%M} UTC)"


_PHRASES: Final[dict[str, Callable[[AlertContext, npt.NDArray[np.float64]], str | None]]] = {
    "amount": _amount,
    "amount_vs_usual": _amount_vs_usual,
    "terminal_risk": _terminal_risk,
    "velocity": _velocity,
    "time_of_day": _time_of_day,
}
# Both amount groups speak of the same fact, the amount: said once, their comparisons joined.
_AMOUNT_GROUPS: Final = ("amount", "amount_vs_usual")


def _phrase_all(
    context: AlertContext, mean: npt.NDArray[np.float64], groups: list[str]
) -> list[str]:
    """The chosen groups' phrases; the amount stated once, with every comparison that holds."""
    texts: list[str] = []
    comparisons = [c for g in groups if g in _AMOUNT_GROUPS if (c := _PHRASES[g](context, mean))]
    amount_said = False
    for group in groups:
        if group in _AMOUNT_GROUPS:
            if not amount_said:
                texts.append(f"amount {context.amount:,.2f} is " + " and ".join(comparisons))
                amount_said = True
            continue
        text = _PHRASES[group](context, mean)
        if text:
            texts.append(text)
    return texts


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_LENGTH else text[: MAX_REASON_LENGTH - 3] + "..."


# Given with every score of an event whose stored state was corrupt and set aside: its
# customer or terminal history is missing from the score.
STATE_RESET_REASON: Final = "scored without history: the stored state was corrupt and was reset"


def fallback_reason(score: float) -> str:
    """The reason given when no single group moves the score by :data:`MIN_CONTRIBUTION`."""
    return f"score {score:.2f} comes from the customer's recent sequence as a whole"


def occlusion_contributions(
    sequences: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float64],
    mean: npt.NDArray[np.float64],
    score: ScoreFunction,
) -> npt.NDArray[np.float64]:
    """Each group's contribution to each sequence's score, in log-odds: ``[A, G]``.

    Args:
        sequences: The alerted sequences ``[A, T, F]`` as the model saw them.
        scores: Their scores.
        mean: The card's per-feature normalisation mean.
        score: The model, called exactly once with all ``A * G`` variants.
    """
    n_groups = len(FEATURE_GROUPS)
    variants = np.repeat(sequences, n_groups, axis=0)
    for g, group in enumerate(FEATURE_GROUPS):
        columns = group.index
        variants[g::n_groups, -1, columns] = mean[columns].astype(np.float32)
    occluded = score(variants).reshape(len(sequences), n_groups)
    contributions: npt.NDArray[np.float64] = _log_odds(scores)[:, None] - _log_odds(occluded)
    return contributions


def _log_odds(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    result: npt.NDArray[np.float64] = np.log(q) - np.log1p(-q)
    return result


def explain(
    sequences: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float64],
    contexts: Sequence[AlertContext],
    mean: npt.NDArray[np.float64],
    score: ScoreFunction,
    max_reasons: int = 3,
) -> list[tuple[str, ...]]:
    """Reasons for each alerted sequence, the strongest first, at most ``max_reasons``.

    Every alert gets at least one reason (:func:`fallback_reason` when no group stands
    out). Deterministic: the same inputs and model give the same reasons.
    """
    if len(sequences) == 0:
        return []
    contributions = occlusion_contributions(sequences, scores, mean, score)
    reasons: list[tuple[str, ...]] = []
    for a, context in enumerate(contexts):
        # Stable sort: ties keep the FEATURE_GROUPS order, so reasons never flicker.
        order = np.argsort(-contributions[a], kind="stable")
        groups: list[str] = []
        for g in order:
            name = FEATURE_GROUPS[g].name
            if contributions[a, g] < MIN_CONTRIBUTION:
                break
            facts = len({"amount" if n in _AMOUNT_GROUPS else n for n in [*groups, name]})
            if facts > max_reasons:
                break
            # Only facts that point towards fraud: a group whose occlusion lowered the score
            # but whose value looks ordinary (a terminal with no known fraud) is passed over.
            if _PHRASES[name](context, mean) is not None:
                groups.append(name)
        texts = tuple(_clip(text) for text in _phrase_all(context, mean, groups))
        reasons.append(texts or (fallback_reason(context.score),))
    return reasons
