"""Decisions from scores: the model card's thresholds, optionally overridden by settings."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from stream_app.models.card import Thresholds
from stream_app.records import Decision

_DECISIONS = np.array([Decision.APPROVE, Decision.REVIEW, Decision.DECLINE], dtype=object)


def decide(scores: npt.NDArray[np.float64], thresholds: Thresholds) -> list[Decision]:
    """``decline`` at or above the decline threshold, ``review`` at or above review."""
    level = (scores >= thresholds.review).astype(np.int64) + (scores >= thresholds.decline)
    return list(_DECISIONS[level])
