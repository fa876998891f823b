"""Batch scoring of a transactions file: the offline reference the stream worker reproduces.

Features come from :func:`stream_app.features.offline_features` (labels known after the
delay, as the worker's label consumer makes them), scores from :class:`OnnxScorer`, decisions
from the card's thresholds: the same three definitions the worker uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from stream_app import features
from stream_app.models.card import Thresholds
from stream_app.models.scorer import OnnxScorer
from stream_app.scoring.decisions import decide
from training.transactions import output_format, read_transactions, to_arrays

SCORE_COLUMNS = (
    "TRANSACTION_ID",
    "CUSTOMER_ID",
    "TERMINAL_ID",
    "TX_DATETIME",
    "TX_AMOUNT",
    "score",
    "decision",
    "model_version",
)


@dataclass(frozen=True)
class ScoredFile:
    """Scores of every row of a file, in the file's row order."""

    table: pd.DataFrame
    model_version: str
    # AUC ROC, average precision and card precision@100 against the file's labels, when
    # it has both frauds and genuine transactions (see :func:`label_quality`).
    quality: dict[str, float] | None = None


def score_table(
    df: pd.DataFrame,
    scorer: OnnxScorer,
    thresholds: Thresholds | None = None,
    chunk_rows: int = 100_000,
) -> ScoredFile:
    """Score every row of a transactions table with one model."""
    arrays = to_arrays(df)
    offline = features.offline_features(
        arrays.customer_ids,
        arrays.terminal_ids,
        arrays.times_ms,
        arrays.amounts,
        arrays.is_fraud,
    )
    canonical: npt.NDArray[np.float64] = np.empty(len(df), dtype=np.float64)
    for start in range(0, len(df), chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, len(df)), dtype=np.int64)
        canonical[rows] = scorer.score(offline.sequences(scorer.sequence_length, rows))
    scores = np.empty_like(canonical)
    scores[offline.order] = canonical
    decisions = decide(scores, thresholds or scorer.card.thresholds)
    table = df[["TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID", "TX_DATETIME", "TX_AMOUNT"]].copy()
    table["score"] = scores
    table["decision"] = [str(d) for d in decisions]
    table["model_version"] = scorer.version
    return ScoredFile(table=table, model_version=scorer.version)


def score_file(data: Path, model_dir: Path, out: Path) -> ScoredFile:
    """Score a transactions file and write the scores (Parquet or CSV, by extension)."""
    file_format = output_format(out)
    scorer = OnnxScorer(model_dir)
    frame = read_transactions(data)
    scored = score_table(frame, scorer)
    out.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "parquet":
        scored.table.to_parquet(out, index=False)
    else:
        scored.table.to_csv(out, index=False)
    return ScoredFile(scored.table, scored.model_version, label_quality(frame, scored.table))


def label_quality(frame: pd.DataFrame, scores: pd.DataFrame) -> dict[str, float] | None:
    """The evaluation's metrics (:func:`training.evaluation.assess`: AUC ROC, average
    precision, card precision@100 per day) of ``scores`` against the file's ``TX_FRAUD``.

    None when the labels cannot rank anything (no fraud, or nothing but frauds), or where
    the evaluation's dependency (scikit-learn, the ``train`` extra) is not installed.
    """
    labels = frame["TX_FRAUD"].to_numpy(dtype=np.int64)
    if labels.min() == labels.max():
        return None
    try:
        from training.evaluation import assess
    except ImportError:
        return None
    days = frame["TX_DATETIME"].to_numpy(dtype="datetime64[D]").astype(np.int64)
    cards = frame["CUSTOMER_ID"].to_numpy(dtype=np.int64)
    return assess(days, cards, labels, scores["score"].to_numpy(dtype=np.float64))
