"""ONNX equals PyTorch for every shipped model whose directory holds its PyTorch weights.

``tests/stream_app/models/test_contract.py`` checks the shipped models without torch (the
serving tests run without it), trusting the parity record export wrote into each card. Here,
where ``fraudstream train`` left ``model.pt`` beside the graph, the PyTorch model is rebuilt
from it (:func:`training.export.load_trained`, its family from the card) and compared with
ONNX Runtime on fresh inputs, including far out-of-range ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_app.models.scorer import OnnxScorer
from tests.stream_app.models.test_contract import MODEL_DIRS, contract_inputs
from training.export import WEIGHTS_FILE, load_trained
from training.sequence_model import predict

WITH_WEIGHTS = [d for d in MODEL_DIRS if (d / WEIGHTS_FILE).is_file()]


def test_the_default_model_ships_its_weights() -> None:
    assert any(d.name == "default" for d in WITH_WEIGHTS)


def onnx_equals_pytorch(scorer: OnnxScorer) -> None:
    """ONNX Runtime scores as the PyTorch model rebuilt from the directory's ``model.pt``
    (also one of the contract checks ``tests/training/test_export.py`` runs on an export)."""
    model, card = load_trained(scorer.directory)
    batch = contract_inputs(card)
    np.testing.assert_allclose(scorer.score(batch), predict(model, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("directory", WITH_WEIGHTS, ids=[d.name for d in WITH_WEIGHTS])
def test_onnx_equals_pytorch(directory: Path) -> None:
    onnx_equals_pytorch(OnnxScorer(directory))
