"""Plain-words reasons for alerts: which features drove a score, by occlusion.

For each alerted event and each :data:`FEATURE_GROUPS` group, the group's values in the
current (last) step of the sequence are replaced by the model card's normalisation mean,
i.e. by an unremarkable transaction, and the variants of all alerts are rescored in ONE
extra model call. A group's contribution is the drop in log-odds its occlusion causes (in
log-odds rather than probability so that a score saturated near 1 by two signals, each
enough alone, still shows both); the largest positive ones are phrased with the event's
actual values, e.g. "amount 512.30 is 5.1x the customer's 30-day average (100.45)".

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


def _amount(context: AlertContext, mean: npt.NDArray[np.float64]) -> str:
    typical = float(mean[F.FEATURE_INDEX["TX_AMOUNT"]])
    if typical > 0 and context.amount >= 1.5 * typical:
        ratio = context.amount / typical
        return (
            f"amount {context.amount:,.2f} is {ratio:.1f}x the average transaction ({typical:,.2f})"
        )
    return f"amount {context.amount:,.2f} (average transaction {typical:,.2f})"


def _amount_vs_usual(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str:
    n30 = _f(context, "CUSTOMER_ID_NB_TX_30DAY_WINDOW")
    ratio = _f(context, "AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY")
    if n30 <= 1 or ratio <= 0:
        return f"amount {context.amount:,.2f} is the customer's first in 30 days"
    prior = context.amount / ratio
    return (
        f"amount {context.amount:,.2f} is {ratio:.1f}x the customer's 30-day average ({prior:,.2f})"
    )


def _terminal_risk(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str:
    windows = F.TERMINAL_WINDOWS_DAYS
    risks = [_f(context, f"TERMINAL_ID_RISK_{w}DAY_WINDOW") for w in windows]
    w = windows[int(np.argmax(risks))] if max(risks) > 0 else max(windows)
    n = round(_f(context, f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"))
    frauds = round(_f(context, f"TERMINAL_ID_RISK_{w}DAY_WINDOW") * n)
    if n == 0:
        return f"terminal has no transactions in its last {w} days of known outcomes"
    return f"terminal had {frauds} known frauds in {n} transactions over {w} days"


def _velocity(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str:
    gap_s = math.expm1(_f(context, "LOG_SECONDS_SINCE_PREV_TX"))
    n1 = round(_f(context, "CUSTOMER_ID_NB_TX_1DAY_WINDOW"))
    daily = _f(context, "CUSTOMER_ID_NB_TX_30DAY_WINDOW") / 30
    if n1 > 1 and gap_s < _SHORT_GAP_S:
        return (
            f"{gap_s:.0f} s after the customer's previous transaction, "
            f"{n1} in 24 hours ({daily:.1f} a day over 30 days)"
        )
    return f"{n1} transactions by the customer in 24 hours ({daily:.1f} a day over 30 days)"


def _time_of_day(context: AlertContext, _mean: npt.NDArray[np.float64]) -> str:
    moment = datetime.fromtimestamp(context.time_ms / 1000, UTC)
    when = f"made at {moment:%H:%M} UTC"
    if _f(context, "TX_DURING_NIGHT") > 0:
        when += ", at night"
    if _f(context, "TX_DURING_WEEKEND") > 0:
        when += ", on a weekend"
    return when


_PHRASES: Final[dict[str, Callable[[AlertContext, npt.NDArray[np.float64]], str]]] = {
    "amount": _amount,
    "amount_vs_usual": _amount_vs_usual,
    "terminal_risk": _terminal_risk,
    "velocity": _velocity,
    "time_of_day": _time_of_day,
}


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
        chosen = [g for g in order[:max_reasons] if contributions[a, g] >= MIN_CONTRIBUTION]
        texts = tuple(_clip(_PHRASES[FEATURE_GROUPS[g].name](context, mean)) for g in chosen)
        reasons.append(texts or (fallback_reason(context.score),))
    return reasons
