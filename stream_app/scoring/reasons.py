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

The same call also removes, one at a time, each earlier transaction of the customer from
the sequence (the older ones move up a step, a padding row fills the front, as for a
customer with a shorter history; TimeSHAP's event-level perturbation). The drop in
log-odds says how much that transaction drove a sequence model's score; the strongest one
competes with the feature groups for a reason ("the transaction 2 before, 250.00, 3 min
earlier, raised the score"), and every contribution goes into the alert's
``attributions`` for downstream tools. The customer's history keeps each transaction's
time and amount, not its terminal, so the terminal is not named.
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
from stream_app.records import MAX_ATTRIBUTIONS, MAX_REASON_LENGTH, Attribution

ScoreFunction = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]]

# Contributions below this (log-odds; about a point of probability at a score of 0.2) are
# noise, not a reason.
MIN_CONTRIBUTION: Final = 0.05
# Probabilities are clipped this far from 0 and 1 before their log-odds are taken.
_EPS: Final = 1e-7
_SHORT_GAP_S: Final = 600.0  # a previous transaction closer than this is worth saying
# A real row counts at least itself in its customer's 1-day window; padding rows are zero.
_PRESENCE: Final = F.FEATURE_INDEX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]


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
    # (time in ms, amount) of the sequence's earlier transactions, oldest first: the real
    # rows before the last one (a short history has fewer than T - 1).
    earlier: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Explanation:
    """An alert's reasons (plain words) and attributions (structured, every contribution)."""

    reasons: tuple[str, ...]
    attributions: tuple[Attribution, ...]


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
    """ "45 s", "3 min", "5 h", "3 days": whole units, the largest that reads well.

    >>> _duration(45), _duration(180), _duration(10_140), _duration(300_000)
    ('45 s', '3 min', '3 h', '3 days')
    """
    if seconds < 60:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86_400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86_400:.0f} days"


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


def occlusion(
    sequences: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float64],
    mean: npt.NDArray[np.float64],
    score: ScoreFunction,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Each group's and each earlier transaction's contribution to each sequence's score,
    in log-odds: ``[A, G]`` and ``[A, T - 1]`` (NaN where the row is padding).

    Args:
        sequences: The alerted sequences ``[A, T, F]`` as the model saw them.
        scores: Their scores.
        mean: The card's per-feature normalisation mean.
        score: The model, called exactly once with all ``A * (G + T - 1)`` variants.
    """
    n, length, _ = sequences.shape
    n_groups = len(FEATURE_GROUPS)
    grouped = np.repeat(sequences, n_groups, axis=0)
    for g, group in enumerate(FEATURE_GROUPS):
        columns = group.index
        grouped[g::n_groups, -1, columns] = mean[columns].astype(np.float32)
    # Row j removed: the rows before it move one step later, padding fills the front.
    removed = np.repeat(sequences[:, None], length - 1, axis=1)
    for j in range(length - 1):
        removed[:, j, 1 : j + 1] = sequences[:, :j]
        removed[:, j, 0] = 0.0
    flat = removed.reshape(n * (length - 1), *sequences.shape[1:])
    out = score(np.concatenate([grouped, flat]))
    base = _log_odds(scores)[:, None]
    groups: npt.NDArray[np.float64] = base - _log_odds(out[: n * n_groups].reshape(n, n_groups))
    events: npt.NDArray[np.float64] = base - _log_odds(out[n * n_groups :].reshape(n, length - 1))
    events[sequences[:, :-1, _PRESENCE] <= 0] = np.nan
    return groups, events


def occlusion_contributions(
    sequences: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float64],
    mean: npt.NDArray[np.float64],
    score: ScoreFunction,
) -> npt.NDArray[np.float64]:
    """Each group's contribution to each sequence's score, in log-odds: ``[A, G]``."""
    return occlusion(sequences, scores, mean, score)[0]


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
    """Reasons for each alerted sequence, the strongest first, at most ``max_reasons``
    (:func:`explain_alerts` without the attributions)."""
    explained = explain_alerts(sequences, scores, contexts, mean, score, max_reasons)
    return [e.reasons for e in explained]


def explain_alerts(
    sequences: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float64],
    contexts: Sequence[AlertContext],
    mean: npt.NDArray[np.float64],
    score: ScoreFunction,
    max_reasons: int = 3,
) -> list[Explanation]:
    """Reasons and attributions of each alerted sequence, in one model call.

    Every alert gets at least one reason (:func:`fallback_reason` when nothing stands out).
    Deterministic: the same inputs and model give the same explanations.
    """
    if len(sequences) == 0:
        return []
    contributions, events = occlusion(sequences, scores, mean, score)
    explained: list[Explanation] = []
    for a, context in enumerate(contexts):
        earlier = _earlier_steps(context, sequences.shape[1])
        best = _strongest_event(events[a], earlier)
        # Stable sort: ties keep the FEATURE_GROUPS order, so reasons never flicker.
        order = np.argsort(-contributions[a], kind="stable")
        candidates = [(float(contributions[a, g]), FEATURE_GROUPS[g].name) for g in order]
        if best is not None:
            candidates.append((float(events[a, best]), _EVENT))
            candidates.sort(key=lambda c: -c[0])  # stable: a tie keeps the group first
        chosen: list[str] = []  # group names, and _EVENT for the strongest transaction
        for value, name in candidates:
            if value < MIN_CONTRIBUTION:
                break
            facts = len({"amount" if n in _AMOUNT_GROUPS else n for n in [*chosen, name]})
            if facts > max_reasons:
                break
            # Only facts that point towards fraud: a group whose occlusion lowered the score
            # but whose value looks ordinary (a terminal with no known fraud) is passed over.
            if name == _EVENT or _PHRASES[name](context, mean) is not None:
                chosen.append(name)
        texts = _phrase_all(context, mean, [n for n in chosen if n != _EVENT])
        if best is not None and _EVENT in chosen:
            # In its rank among the facts (the amount's groups make one phrase).
            rank = len(
                {"amount" if n in _AMOUNT_GROUPS else n for n in chosen[: chosen.index(_EVENT)]}
            )
            texts.insert(rank, _event_phrase(context, earlier[best]))
        reasons = tuple(_clip(text) for text in texts) or (fallback_reason(context.score),)
        explained.append(
            Explanation(reasons, _attributions(contributions[a], events[a], context, earlier))
        )
    return explained


_EVENT: Final = "event"


def _earlier_steps(context: AlertContext, length: int) -> dict[int, tuple[int, float]]:
    """Row of the sequence -> (time ms, amount) of each earlier real transaction."""
    first = length - 1 - len(context.earlier)
    return {first + k: fact for k, fact in enumerate(context.earlier)}


def _strongest_event(
    events: npt.NDArray[np.float64], earlier: dict[int, tuple[int, float]]
) -> int | None:
    """The row whose removal lowers the score most (None without an earlier transaction)."""
    rows = [j for j in earlier if np.isfinite(events[j])]
    if not rows:
        return None
    return max(rows, key=lambda j: (float(events[j]), j))  # a tie: the most recent


def _event_phrase(context: AlertContext, fact: tuple[int, float]) -> str:
    """The earlier transaction that drove the score, with its own facts."""
    time_ms, amount = fact
    steps = len(context.earlier) - context.earlier.index(fact)
    which = "the previous transaction" if steps == 1 else f"the transaction {steps} before"
    gap = _duration((context.time_ms - time_ms) / 1000)
    return f"{which}, {money(amount)}, {gap} earlier, raised the score"


def _attributions(
    groups: npt.NDArray[np.float64],
    events: npt.NDArray[np.float64],
    context: AlertContext,
    earlier: dict[int, tuple[int, float]],
) -> tuple[Attribution, ...]:
    """Every contribution, largest first: the earlier transactions and the groups."""
    last = len(events)  # the current transaction's row
    found = [
        Attribution(
            kind="transaction",
            log_odds=round(float(events[j]), 4),
            transactions_before=last - j,
            amount=fact[1],
            seconds_before=round((context.time_ms - fact[0]) / 1000, 3),
        )
        for j, fact in earlier.items()
        if np.isfinite(events[j])
    ]
    found += [
        Attribution(kind="features", log_odds=round(float(groups[g]), 4), group=group.name)
        for g, group in enumerate(FEATURE_GROUPS)
    ]
    found.sort(key=lambda x: -x.log_odds)
    return tuple(found[:MAX_ATTRIBUTIONS])
