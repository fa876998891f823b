"""The contract every shipped model keeps, checked over every directory in onnx_models/.

For each model: the card loads and the ONNX graph matches it (OnnxScorer's serving checks:
SHA-256, input/output signature, probe scores), outputs are probabilities, scoring is
deterministic, batch 1 equals batch N, and ONNX equals the PyTorch model: the parity record
export wrote into the card (checked against >= 1000 test sequences) and the probe scores
OnnxScorer re-checks. These tests need no torch; where a directory ships the PyTorch weights
(``model.pt``), ``tests/training/test_shipped_weights.py`` also rebuilds the PyTorch model and
compares on fresh inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_app import features
from stream_app.models.card import CARD_FILE, MODEL_FILE, ModelCard
from stream_app.models.scorer import OnnxScorer, probe_batch

MODELS_ROOT = Path(__file__).resolve().parents[3] / "onnx_models"
MODEL_DIRS = sorted(p.parent for p in MODELS_ROOT.glob(f"*/{CARD_FILE}"))
MAX_MODEL_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module", params=MODEL_DIRS, ids=[p.name for p in MODEL_DIRS])
def scorer(request: pytest.FixtureRequest) -> OnnxScorer:
    return OnnxScorer(request.param)  # refuses a bad card, hash, signature or probe


def contract_inputs(card: ModelCard, n: int = 256) -> np.ndarray:
    """Plausible sequences, some padded, a few with extreme values."""
    batch = probe_batch(card, n)
    batch[:, :, features.FEATURE_INDEX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]] = (
        np.abs(batch[:, :, features.FEATURE_INDEX["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]]) + 1.0
    )
    batch[: n // 4, : card.sequence_length - 1] = 0.0  # one real row, the rest padding
    batch[-4:] *= 50.0  # far outside the training range: must still be a probability
    return batch.astype(np.float32)


def test_there_is_a_default_model() -> None:
    assert MODELS_ROOT / "default" in MODEL_DIRS


def test_card_matches_the_features_and_the_graph(scorer: OnnxScorer) -> None:
    card = scorer.card
    assert card.feature_names == list(features.FEATURE_NAMES)
    shape = scorer.session.get_inputs()[0].shape
    assert list(shape[1:]) == [card.sequence_length, len(card.feature_names)]
    assert (scorer.directory / MODEL_FILE).stat().st_size < MAX_MODEL_BYTES
    assert 0.0 <= card.thresholds.review <= card.thresholds.decline <= 1.0
    assert card.thresholds.review_rule and card.thresholds.decline_rule


def test_outputs_are_probabilities(scorer: OnnxScorer) -> None:
    scores = scorer.score(contract_inputs(scorer.card))
    assert scores.shape == (256,)
    assert np.all(np.isfinite(scores)) and scores.min() >= 0.0 and scores.max() <= 1.0


def test_scoring_is_deterministic(scorer: OnnxScorer) -> None:
    batch = contract_inputs(scorer.card)
    np.testing.assert_array_equal(scorer.score(batch), scorer.score(batch))


def test_batch_of_one_equals_batch_of_many(scorer: OnnxScorer) -> None:
    batch = contract_inputs(scorer.card, 64)
    together = scorer.score(batch)
    alone = np.concatenate([scorer.score(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(alone, together, rtol=0, atol=1e-6)


def test_the_card_records_onnx_equal_to_pytorch(scorer: OnnxScorer) -> None:
    parity = scorer.card.parity  # what export measured before writing the model
    assert parity["sequences"] >= 1000
    assert max(parity["max_abs_diff_batch_1"], parity["max_abs_diff_batch_n"]) <= 1e-5
