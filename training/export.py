"""Export a trained scorer (any family) to ONNX with its model card, refusing on any mismatch.

Two ways in, one way out (:func:`export_model`):

* ``fraudstream train`` hands over the model it has just trained;
* ``fraudstream export`` (:func:`export_trained`) rebuilds it from the directory ``train``
  wrote: the PyTorch weights (``model.pt``), the card (architecture, thresholds, training
  record) and the transactions file the card names, whose test rows give the same parity
  sequences again (:func:`parity_rows`).

The graph has a dynamic batch axis and a fixed sequence length (recorded in the card). Before
anything is written, ONNX Runtime must reproduce the PyTorch scores to 1e-5 on the parity
sequences, run one at a time and as one batch. The directory (``model.onnx``,
``model_card.json`` and the weights ``model.pt``) is assembled next to its target and renamed
into place, so a worker watching for new models never sees half a model.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from stream_app import features
from stream_app.errors import ConfigError, ModelError
from stream_app.models.card import (
    CARD_FILE,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    SCORE_BUCKET_EDGES,
    ModelCard,
    Normalisation,
    ScoreHistogram,
    Thresholds,
    load_card,
)
from stream_app.models.scorer import OnnxScorer, file_sha256, probe_batch
from training.dataset import FileFeatures, IntArray, Period, file_features, iso_day
from training.evaluation import DELTA_DAYS, Split, assessment_rows
from training.onnx_graph import OPSET, write_onnx
from training.sequence_model import ModelConfig, SequenceScorer, build_scorer, predict
from training.transactions import read_transactions

PARITY_TOLERANCE: Final = 1e-5
MIN_PARITY_SEQUENCES: Final = 1000
MAX_PARITY_SEQUENCES: Final = 4096  # enough for the check, a few seconds one at a time
WEIGHTS_FILE: Final = "model.pt"


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


def parity_rows(data: FileFeatures, split: Split) -> IntArray:
    """The rows whose sequences the parity check scores.

    The split's test rows, known-compromised cards removed as ``evaluate`` does; where they
    are fewer than :data:`MIN_PARITY_SEQUENCES` (a model trained up to the file's end), the
    file's last 7 days instead. At most :data:`MAX_PARITY_SEQUENCES`, in canonical order.
    """
    rows = assessment_rows(data, split)
    if len(rows) < MIN_PARITY_SEQUENCES:
        rows = data.rows(Period(data.last_day - 6, data.last_day))
    return rows[:MAX_PARITY_SEQUENCES]


def check_tolerance(tolerance: float) -> None:
    """Refuse a parity tolerance looser than the model contract's (or negative).

    >>> check_tolerance(1e-6)
    """
    if not 0.0 <= tolerance <= PARITY_TOLERANCE:
        raise ConfigError(
            f"the parity tolerance must be between 0 and {PARITY_TOLERANCE:g} (the model "
            f"contract's), got {tolerance:g}"
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
    model: SequenceScorer,
    directory: Path,
    *,
    version: str,
    parity_sequences: npt.NDArray[np.float32],
    thresholds: Thresholds,
    reference: ScoreHistogram,
    training: dict[str, Any],
    metrics: dict[str, Any],
    gan_fidelity: dict[str, Any] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = False,
) -> ModelCard:
    """Write ``model.onnx``, ``model_card.json`` and ``model.pt`` into ``directory``.

    Args:
        model: the trained scorer.
        directory: the model directory to write (replaced as a whole with ``overwrite``).
        version: the card's model version.
        parity_sequences: at least :data:`MIN_PARITY_SEQUENCES` sequences ``[N, T, F]``;
            ``T`` becomes the card's sequence length.
        thresholds, training, metrics, gan_fidelity: recorded in the card as given.
        reference: the score histogram the worker's drift gauge compares with.
        tolerance: the largest accepted ``|PyTorch - ONNX|`` score; only a stricter one than
            :data:`PARITY_TOLERANCE` may be asked for.
        overwrite: replace an existing ``directory``.

    Returns:
        The card written.

    Raises:
        ModelError: the PyTorch scores are not finite, ONNX Runtime disagrees with PyTorch by
            more than ``tolerance``, too few parity sequences were given, or ``directory``
            exists and ``overwrite`` is false. Nothing is written then.
        ConfigError: ``tolerance`` is negative or looser than :data:`PARITY_TOLERANCE`.
    """
    check_tolerance(tolerance)
    if len(parity_sequences) < MIN_PARITY_SEQUENCES:
        raise ModelError(
            f"parity needs at least {MIN_PARITY_SEQUENCES} test sequences, "
            f"got {len(parity_sequences)}"
        )
    if directory.exists() and not overwrite:
        raise ModelError(f"{directory} exists: choose a new directory or pass --overwrite")
    model = model.eval()
    torch_scores = predict(model, parity_sequences)
    broken = int(np.count_nonzero(~np.isfinite(torch_scores)))
    if broken:
        raise ModelError(
            f"PyTorch scores {broken} of the {len(parity_sequences)} parity sequences as NaN or "
            "infinity: the weights are broken; the model was not written"
        )
    sequence_length = int(parity_sequences.shape[1])
    mean = model.get_buffer("mean").double().numpy()
    inv_std = model.get_buffer("inv_std").double().numpy()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    staging.chmod(0o755)
    try:
        model_path = staging / MODEL_FILE
        write_onnx(model, parity_sequences, model_path)
        single = _onnx_scores(model_path, parity_sequences, batch=1)
        batched = _onnx_scores(model_path, parity_sequences, batch=len(parity_sequences))
        worst_single = float(np.max(np.abs(single - torch_scores)))
        worst_batched = float(np.max(np.abs(batched - torch_scores)))
        if not max(worst_single, worst_batched) <= tolerance:
            raise ModelError(
                f"ONNX differs from PyTorch by {max(worst_single, worst_batched):.2e} "
                f"(tolerance {tolerance:g}); the model was not written"
            )
        card = ModelCard(
            version=version,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            model_sha256=file_sha256(model_path),
            opset=OPSET,
            architecture=f"{model.config.family} sequence scorer {model.config.to_dict()}",
            sequence_length=sequence_length,
            feature_names=list(features.FEATURE_NAMES),
            feature_version=features.FEATURE_VERSION,
            label_delay_days=features.LABEL_DELAY_DAYS,
            normalisation=Normalisation(mean=mean.tolist(), std=(1.0 / inv_std).tolist()),
            thresholds=thresholds,
            training=training,
            metrics=metrics,
            gan_fidelity=gan_fidelity,
            reference_score_histogram=reference,
        )
        probe = probe_batch(card)
        probe_scores = predict(model, probe)
        card = card.model_copy(
            update={
                "parity": {
                    "sequences": len(parity_sequences),
                    "max_abs_diff_batch_1": worst_single,
                    "max_abs_diff_batch_n": worst_batched,
                    "tolerance": tolerance,
                    "probe_scores": [float(s) for s in probe_scores],
                }
            }
        )
        card.write(staging)
        # The PyTorch weights too (a few hundred kB): the model contract test rebuilds the
        # model from them, and `fraudstream export` exports it again.
        torch.save(model.state_dict(), staging / WEIGHTS_FILE)
        OnnxScorer(staging)  # the serving checks, exactly as the worker will run them
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def load_trained(directory: Path) -> tuple[SequenceScorer, ModelCard]:
    """The PyTorch model and the card of a model directory, as :func:`export_model` wrote it.

    Raises:
        ModelError: the card is missing or invalid, records no model configuration, or
            ``model.pt`` is missing or does not fit the architecture the card describes.
    """
    card = load_card(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(
            f"{directory} has no {WEIGHTS_FILE}: exporting needs the PyTorch weights that "
            "fraudstream train writes"
        )
    try:
        config = ModelConfig(**card.training["config"]["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"{directory / CARD_FILE}: training.config.model does not describe a scorer "
            f"({exc!r}); was the model written by fraudstream train?"
        ) from None
    normalisation = card.normalisation
    model = build_scorer(np.asarray(normalisation.mean), np.asarray(normalisation.std), config)
    try:
        model.load_state_dict(torch.load(weights, weights_only=True))
    except (RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{weights} does not hold the weights of the model its card describes: {first}"
        ) from exc
    return model.eval(), card


def training_split(card: ModelCard) -> Split:
    """The training / delay / test layout the card's model was trained and tested with.

    ``train`` records it in ``training.split``; for a card written before that, it is
    rebuilt as ``train`` made it: 7 training days ending with the last training day, 7 delay
    days, then the card's test period (7 days where the card has none).
    """
    recorded = card.training.get("split")
    try:
        if isinstance(recorded, dict):
            delay = str(recorded["delay"])
            return Split(
                train=Period.parse(str(recorded["train"])),
                delay_days=Period.parse(delay).days if delay else 0,
                test=Period.parse(str(recorded["test"])),
            )
        last = Period.parse(str(card.training["train_days"])).last_day
        test = card.metrics.get("test_period")
        test_days = Period.parse(str(test)).days if test else DELTA_DAYS
        return Split.starting(iso_day(last - DELTA_DAYS + 1), DELTA_DAYS, DELTA_DAYS, test_days)
    except (KeyError, ConfigError) as exc:
        raise ModelError(
            f"model {card.version}: its card records no usable training split ({exc}); was "
            "it written by fraudstream train?"
        ) from None


def export_trained(
    source: Path,
    directory: Path,
    *,
    data: Path | None = None,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = False,
) -> ModelCard:
    """Export the model ``fraudstream train`` wrote in ``source`` again, into ``directory``.

    Everything the card says about training (version, thresholds, training record, metrics,
    reference histogram, GAN fidelity) is kept; the graph, its hash, the parity record and the
    creation time are new. The parity sequences are the ones ``train`` checked: the test rows
    of the card's :func:`training_split` in ``data``.

    Args:
        source: a model directory with ``model.pt`` and ``model_card.json``.
        directory: the model directory to write.
        data: the transactions file the model was trained on; default the one the card names.
        tolerance, overwrite: as for :func:`export_model`.

    Raises:
        ModelError: ``source`` is not a trained model directory, ``data`` is not the file the
            model was trained on (by SHA-256), or :func:`export_model` refuses the model.
        ConfigError: ``data`` cannot be read, or the tolerance is out of range.
    """
    check_tolerance(tolerance)
    model, card = load_trained(source)
    if directory.exists() and not overwrite:  # before reading the data, not after
        raise ModelError(f"{directory} exists: choose a new directory or pass --overwrite")
    path = data if data is not None else Path(str(card.training.get("data_file", "")))
    expected = str(card.training.get("data_sha256", ""))
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: pass the transactions file model {card.version} was "
            "trained on with --data"
        )
    actual = file_sha256(path)
    if actual != expected:
        raise ModelError(
            f"{path} is not the file model {card.version} was trained on (SHA-256 "
            f"{actual[:12]}…, its card records {expected[:12] or 'none'}…): the parity sequences "
            "come from that file; pass it with --data"
        )
    split = training_split(card)
    frame = file_features(read_transactions(path))
    sequences = frame.offline.sequences(card.sequence_length, parity_rows(frame, split))
    return export_model(
        model,
        directory,
        version=card.version,
        parity_sequences=sequences,
        thresholds=card.thresholds,
        reference=card.reference_score_histogram,
        training=card.training,
        metrics=card.metrics,
        gan_fidelity=card.gan_fidelity,
        tolerance=tolerance,
        overwrite=overwrite,
    )
