"""The serving tests' models, built without torch from the models the repository ships.

The worker tests need real ONNX models with versions of their own, thresholds that give every
test replay alerts of both kinds, a second model of another family (swaps and shadow scoring,
which the worker does with no family-specific code) and a model that fails on some inputs.
Training them made every serving test need torch; instead each one is derived here from a
graph in ``onnx_models/`` with ONNX Runtime (and, for the poisoned one, the ``onnx`` package),
in a fraction of a second:

* ``served_model`` (``test-a``): the graph of ``onnx_models/default`` (the LSTM);
* ``second_model`` (``test-b``): the graph of ``onnx_models/ffnn`` (the feed-forward family);
* ``poisoned_model`` (``test-poisoned``): the default graph with nodes appended that output
  NaN where the current transaction's amount exceeds :data:`POISON_AMOUNT`.

:func:`derive_model` writes every one of their cards, and each directory then passes the
serving checks the worker runs (:class:`OnnxScorer`: SHA-256, signature, probe scores)
before a test sees it. ``tests/conftest.py`` re-exports the fixtures.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import pytest

from stream_app.models.card import MODEL_FILE, OUTPUT_NAME, Thresholds, load_card
from stream_app.models.scorer import OnnxScorer, file_sha256
from tests.kafka_fixtures import Dataset
from training.dataset import file_features

MODELS_ROOT: Final = Path(__file__).resolve().parents[1] / "onnx_models"
DEFAULT_MODEL: Final = MODELS_ROOT / "default"
SECOND_FAMILY_MODEL: Final = MODELS_ROOT / "ffnn"
# How many transactions of a customer the test models read: the shipped default's.
TEST_SEQUENCE_LENGTH: Final = load_card(DEFAULT_MODEL).sequence_length
# Shares of the test data's rows at or above the review and the decline threshold (about 7%
# reviewed and 2% declined), so every test replay has alerts of both kinds.
REVIEW_QUANTILE: Final = 0.93
DECLINE_QUANTILE: Final = 0.98
# Amounts above this (within the event contract) make the poisoned model output NaN.
POISON_AMOUNT: Final = 1_000_000.0
_UNPOISONED: Final = "score_unpoisoned"


def derive_model(
    source: Path, directory: Path, frame: pd.DataFrame, *, version: str, graph: bytes | None = None
) -> Path:
    """Write a model directory serving ``source``'s graph (or ``graph``, an edit of it) as
    ``version``; returns ``directory``.

    The card is ``source``'s (features, normalisation, parity record, reference histogram)
    with the new version and the graph's SHA-256; its thresholds are the
    :data:`REVIEW_QUANTILE` / :data:`DECLINE_QUANTILE` quantiles of the model's ONNX Runtime
    scores on ``frame``'s sequences. The probe scores stay the ones export computed in PyTorch
    for ``source``, so an edited graph must still reproduce them to load.
    """
    base = load_card(source)
    directory.mkdir(parents=True)
    model_path = directory / MODEL_FILE
    if graph is None:
        shutil.copyfile(source / base.model_file, model_path)
    else:
        model_path.write_bytes(graph)
    card = base.model_copy(
        update={
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model_file": MODEL_FILE,
            "model_sha256": file_sha256(model_path),
            "training": {"derived_from": f"{source.name} ({base.version})", "by": __name__},
            "metrics": {},
        }
    )
    card.write(directory)
    sequences = file_features(frame).offline.sequences(card.sequence_length)
    scores = OnnxScorer(directory).score(sequences)  # the serving checks, then the scores
    review, decline = np.quantile(scores, [REVIEW_QUANTILE, DECLINE_QUANTILE])
    source_note = f"of model {version}'s scores on the tests' simulated transactions"
    thresholds = Thresholds(
        review=float(review),
        decline=float(decline),
        review_rule=f"tests: the {REVIEW_QUANTILE:.0%} quantile {source_note}",
        decline_rule=f"tests: the {DECLINE_QUANTILE:.0%} quantile {source_note}",
    )
    card.model_copy(update={"thresholds": thresholds}).write(directory)
    OnnxScorer(directory)  # the final card loads (validated) as the worker will load it
    return directory


def poisoned_graph(source: Path) -> bytes:
    """``source``'s graph, its score replaced by NaN where ``sequences[:, -1, 0]`` (the current
    transaction's TX_AMOUNT) exceeds :data:`POISON_AMOUNT`: a model fault no validation can
    foresee. Every other score is unchanged, so it passes the probe check."""
    import onnx  # the train extra's (in the dev lock); only this fixture edits a graph
    from onnx import TensorProto, helper, numpy_helper

    card = load_card(source)
    model = onnx.load(str(source / card.model_file))
    graph = model.graph
    for node in graph.node:  # what computed the score now feeds the poison switch
        node.output[:] = [_UNPOISONED if o == OUTPUT_NAME else o for o in node.output]
        node.input[:] = [_UNPOISONED if i == OUTPUT_NAME else i for i in node.input]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(-1, dtype=np.int64), "poison_last_step"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "poison_amount_column"),
            numpy_helper.from_array(np.array(POISON_AMOUNT, dtype=np.float32), "poison_limit"),
            numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "poison_nan"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "Gather", [card.input_name, "poison_last_step"], ["poison_current"], axis=1
            ),
            helper.make_node(
                "Gather", ["poison_current", "poison_amount_column"], ["poison_amount"], axis=1
            ),
            helper.make_node("Greater", ["poison_amount", "poison_limit"], ["poison_hit"]),
            helper.make_node("Where", ["poison_hit", "poison_nan", _UNPOISONED], [OUTPUT_NAME]),
        ]
    )
    graph.value_info.append(helper.make_tensor_value_info(_UNPOISONED, TensorProto.FLOAT, None))
    onnx.checker.check_model(model, full_check=True)
    serialised: bytes = model.SerializeToString()
    return serialised


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory, small_transactions: Dataset) -> Path:
    """The shipped default model as version ``test-a``, for the worker tests."""
    directory = tmp_path_factory.mktemp("models") / "test-a"
    return derive_model(DEFAULT_MODEL, directory, small_transactions.frame, version="test-a")


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory, small_transactions: Dataset) -> Path:
    """Another real model (version ``test-b``) of another family, the feed-forward scorer
    shipped in ``onnx_models/ffnn``: swaps and shadow scoring, which the worker does with no
    family-specific code."""
    directory = tmp_path_factory.mktemp("models") / "test-b"
    return derive_model(SECOND_FAMILY_MODEL, directory, small_transactions.frame, version="test-b")


@pytest.fixture(scope="session")
def poisoned_model(tmp_path_factory: pytest.TempPathFactory, small_transactions: Dataset) -> Path:
    """A real model that outputs NaN past :data:`POISON_AMOUNT` (see :func:`poisoned_graph`),
    for the tests that show one event can never stop scoring."""
    directory = tmp_path_factory.mktemp("models") / "test-poisoned"
    return derive_model(
        DEFAULT_MODEL,
        directory,
        small_transactions.frame,
        version="test-poisoned",
        graph=poisoned_graph(DEFAULT_MODEL),
    )
