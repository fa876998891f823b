"""ONNX Runtime scoring of sequence batches, with the checks a model must pass to serve.

A model directory is refused (:class:`ModelError`) unless its card validates, the ONNX file's
SHA-256 matches the card, the graph's input and output match the card, and the model
reproduces the card's probe scores: the same scores export computed in PyTorch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from stream_app import features
from stream_app.errors import ModelError
from stream_app.models.card import ModelCard, load_card

PROBE_SIZE: Final = 16
PROBE_TOLERANCE: Final = 1e-5


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def probe_batch(card: ModelCard, size: int = PROBE_SIZE) -> npt.NDArray[np.float32]:
    """A deterministic batch of plausible inputs for a model, drawn from its feature stats.

    Export records the model's scores on it in the card; loading checks them again.
    """
    rng = np.random.default_rng(20180401)
    mean = np.asarray(card.normalisation.mean)
    std = np.asarray(card.normalisation.std)
    shape = (size, card.sequence_length, len(card.feature_names))
    batch = mean + std * rng.standard_normal(shape)
    batch[: size // 4, : card.sequence_length // 2] = 0.0  # some padded sequences
    return batch.astype(np.float32)


class OnnxScorer:
    """One loaded model: ``score(sequences) -> probabilities``.

    Args:
        directory: the model directory (``model.onnx`` and ``model_card.json``).
        intra_op_threads: ONNX Runtime threads per call; 1 suits a worker sharing its cores.
    """

    def __init__(self, directory: Path, *, intra_op_threads: int = 1) -> None:
        self.directory = directory
        self.card = load_card(directory)
        model_path = directory / self.card.model_file
        if not model_path.is_file():
            raise ModelError(f"{directory} has no {self.card.model_file}")
        actual = file_sha256(model_path)
        if actual != self.card.model_sha256:
            raise ModelError(
                f"{model_path} has SHA-256 {actual[:12]}…, the card says "
                f"{self.card.model_sha256[:12]}…: the file is corrupt or not this card's model"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        self._check_signature()
        self._check_probe()

    @property
    def version(self) -> str:
        """The model's version, as every ScoreRecord names it."""
        return self.card.version

    @property
    def sequence_length(self) -> int:
        """``T``: how many of a customer's transactions the model reads."""
        return self.card.sequence_length

    def _check_signature(self) -> None:
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].name != self.card.input_name:
            names = [i.name for i in inputs]
            raise ModelError(f"model inputs {names} differ from the card's {self.card.input_name}")
        shape: list[Any] = list(inputs[0].shape)
        expected = [self.card.sequence_length, len(features.FEATURE_NAMES)]
        if len(shape) != 3 or shape[1:] != expected:
            raise ModelError(
                f"model input shape {shape} is not [batch, {expected[0]}, "
                f"{expected[1]}] as the card and features require"
            )
        if not outputs or outputs[0].name != self.card.output_name:
            raise ModelError(f"model has no output named {self.card.output_name}")

    def _check_probe(self) -> None:
        expected = self.card.parity.get("probe_scores")
        if not isinstance(expected, list) or len(expected) != PROBE_SIZE:
            raise ModelError("the card has no parity.probe_scores: re-export the model")
        got = self.score(probe_batch(self.card))
        worst = float(np.max(np.abs(got - np.asarray(expected, dtype=np.float64))))
        if not worst <= PROBE_TOLERANCE:
            raise ModelError(
                f"model scores differ from the card's probe scores by {worst:.2e} "
                f"(tolerance {PROBE_TOLERANCE:g}): the model is not the one the card describes"
            )

    def raw_scores(self, sequences: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The model's output for each sequence ``[B, T, F]``, one ONNX Runtime call, unchecked.

        Rows are independent: a row's output does not depend on the other rows of the batch.
        The caller checks each row with :func:`valid_scores`.
        """
        if len(sequences) == 0:
            return np.zeros(0, dtype=np.float64)
        batch = np.ascontiguousarray(sequences, dtype=np.float32)
        (scores,) = self.session.run([self.card.output_name], {self.card.input_name: batch})
        result: npt.NDArray[np.float64] = np.asarray(scores, dtype=np.float64).reshape(-1)
        return result

    def score(self, sequences: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Fraud probability of each sequence ``[B, T, F]`` in one ONNX Runtime call.

        Raises:
            ModelError: a score is not a probability (not finite, or outside [0, 1]).
        """
        result = self.raw_scores(sequences)
        if not np.all(valid_scores(result)):
            raise ModelError(f"model {self.version} produced scores outside [0, 1]")
        return result


def valid_scores(scores: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Which outputs are probabilities: finite and within [0, 1].

    >>> valid_scores(np.array([0.0, 0.5, 1.0, np.nan, 1.5, -0.1])).tolist()
    [True, True, True, False, False, False]
    """
    with np.errstate(invalid="ignore"):
        ok: npt.NDArray[np.bool_] = np.isfinite(scores) & (scores >= 0.0) & (scores <= 1.0)
    return ok
