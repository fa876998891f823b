"""Export a trained :class:`LstmScorer` to ONNX with its model card, refusing on any mismatch.

The graph has a dynamic batch axis and a fixed sequence length (recorded in the card). Before
anything is written, ONNX Runtime must reproduce the PyTorch scores to 1e-5 on the parity
sequences, run one at a time and as one batch. The directory is assembled next to its target
and renamed into place, so a worker watching for new models never sees half a model.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from stream_app import features
from stream_app.errors import ModelError
from stream_app.model_card import (
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    SCORE_BUCKET_EDGES,
    ModelCard,
    Normalisation,
    ScoreHistogram,
    Thresholds,
)
from stream_app.scoring import OnnxScorer, file_sha256, probe_batch
from training.sequence_model import LstmScorer, predict

OPSET: Final = 17
PARITY_TOLERANCE: Final = 1e-5
MIN_PARITY_SEQUENCES: Final = 1000


def score_histogram(scores: npt.NDArray[np.float64], source: str) -> ScoreHistogram:
    """Share of scores in each :data:`SCORE_BUCKET_EDGES` bucket (upper edge inclusive)."""
    bucket = np.searchsorted(np.asarray(SCORE_BUCKET_EDGES), scores, side="left")
    counts = np.bincount(
        np.minimum(bucket, len(SCORE_BUCKET_EDGES) - 1), minlength=len(SCORE_BUCKET_EDGES)
    )
    fractions = counts / max(len(scores), 1)
    return ScoreHistogram(
        upper_edges=list(SCORE_BUCKET_EDGES),
        fractions=[float(f) for f in fractions],
        source=source,
    )


def _onnx_scores(path: Path, sequences: npt.NDArray[np.float32], batch: int) -> npt.NDArray[Any]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = np.empty(len(sequences), dtype=np.float64)
    for start in range(0, len(sequences), batch):
        chunk = np.ascontiguousarray(sequences[start : start + batch])
        (scores,) = session.run([OUTPUT_NAME], {INPUT_NAME: chunk})
        out[start : start + len(chunk)] = np.asarray(scores).reshape(-1)
    return out


def export_model(
    model: LstmScorer,
    directory: Path,
    *,
    version: str,
    parity_sequences: npt.NDArray[np.float32],
    thresholds: Thresholds,
    reference_scores: npt.NDArray[np.float64],
    reference_source: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
    gan_fidelity: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ModelCard:
    """Write ``model.onnx`` and ``model_card.json`` into ``directory``; return the card.

    Raises:
        ModelError: ONNX Runtime disagrees with PyTorch by more than 1e-5, too few parity
            sequences were given, or ``directory`` exists and ``overwrite`` is false.
    """
    if len(parity_sequences) < MIN_PARITY_SEQUENCES:
        raise ModelError(
            f"parity needs at least {MIN_PARITY_SEQUENCES} test sequences, "
            f"got {len(parity_sequences)}"
        )
    if directory.exists() and not overwrite:
        raise ModelError(f"{directory} exists: choose a new directory or pass --overwrite")
    model = model.eval()
    sequence_length = int(parity_sequences.shape[1])
    mean = model.get_buffer("mean").double().numpy()
    inv_std = model.get_buffer("inv_std").double().numpy()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    staging.chmod(0o755)
    try:
        model_path = staging / MODEL_FILE
        example = torch.from_numpy(np.ascontiguousarray(parity_sequences[:2]))
        torch.onnx.export(
            model,
            (example,),
            str(model_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
        torch_scores = predict(model, parity_sequences)
        single = _onnx_scores(model_path, parity_sequences, batch=1)
        batched = _onnx_scores(model_path, parity_sequences, batch=len(parity_sequences))
        worst_single = float(np.max(np.abs(single - torch_scores)))
        worst_batched = float(np.max(np.abs(batched - torch_scores)))
        if not max(worst_single, worst_batched) <= PARITY_TOLERANCE:
            raise ModelError(
                f"ONNX differs from PyTorch by {max(worst_single, worst_batched):.2e} "
                f"(tolerance {PARITY_TOLERANCE:g}); the model was not written"
            )
        card = ModelCard(
            version=version,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            model_sha256=file_sha256(model_path),
            opset=OPSET,
            architecture=f"LSTM sequence scorer {model.config.to_dict()}",
            sequence_length=sequence_length,
            feature_names=list(features.FEATURE_NAMES),
            label_delay_days=features.LABEL_DELAY_DAYS,
            normalisation=Normalisation(mean=mean.tolist(), std=(1.0 / inv_std).tolist()),
            thresholds=thresholds,
            training=training,
            metrics=metrics,
            gan_fidelity=gan_fidelity,
            reference_score_histogram=score_histogram(reference_scores, reference_source),
        )
        probe = probe_batch(card)
        probe_scores = predict(model, probe)
        card = card.model_copy(
            update={
                "parity": {
                    "sequences": len(parity_sequences),
                    "max_abs_diff_batch_1": worst_single,
                    "max_abs_diff_batch_n": worst_batched,
                    "tolerance": PARITY_TOLERANCE,
                    "probe_scores": [float(s) for s in probe_scores],
                }
            }
        )
        card.write(staging)
        OnnxScorer(staging)  # the serving checks, exactly as the worker will run them
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card
