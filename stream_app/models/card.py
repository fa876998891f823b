"""The model card: what a model directory promises, checked before a model may serve.

A model directory holds ``model.onnx`` and ``model_card.json``. The ONNX graph takes
``sequences`` (float32 ``[batch, T, F]``, raw feature values in :data:`FEATURE_NAMES`
order; normalisation is inside the graph) and returns ``score`` (float32 ``[batch]``, the
fraud probability).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stream_app import features
from stream_app.errors import ModelError

MODEL_FILE: Final = "model.onnx"
CARD_FILE: Final = "model_card.json"
INPUT_NAME: Final = "sequences"
OUTPUT_NAME: Final = "score"
# Score histogram buckets shared by the card's reference histogram and the worker's
# Prometheus histogram, so drift (PSI) compares like with like. Fine near 0, where most
# scores fall, coarser above.
SCORE_BUCKET_EDGES: Final[tuple[float, ...]] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0,
)  # fmt: skip


class Thresholds(BaseModel):
    """Score cut-offs: ``review`` <= score < ``decline`` is reviewed, above is declined."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    review: float = Field(ge=0.0, le=1.0)
    decline: float = Field(ge=0.0, le=1.0)
    review_rule: str = ""
    decline_rule: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.review > self.decline:
            raise ValueError(f"review threshold {self.review} is above decline {self.decline}")
        return self


class Normalisation(BaseModel):
    """Per-feature mean and standard deviation used inside the graph."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: list[float]
    std: list[float]


class ScoreHistogram(BaseModel):
    """Share of scores per bucket (upper edges :data:`SCORE_BUCKET_EDGES`) on reference data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    upper_edges: list[float]
    fractions: list[float]
    source: str = ""


class ModelCard(BaseModel):
    """Everything the worker and an auditor need to know about one exported model."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    version: str = Field(min_length=1, max_length=64)
    created_at: str
    model_file: str = MODEL_FILE
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    opset: int = Field(ge=17)
    architecture: str
    sequence_length: int = Field(ge=1, le=256)
    feature_names: list[str]
    # Cards written before the field existed were trained on version 1 of the features.
    feature_version: int = 1
    label_delay_days: int = features.LABEL_DELAY_DAYS
    normalisation: Normalisation
    thresholds: Thresholds
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    gan_fidelity: dict[str, Any] | None = None
    reference_score_histogram: ScoreHistogram
    parity: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        n = len(self.feature_names)
        if len(self.normalisation.mean) != n or len(self.normalisation.std) != n:
            raise ValueError("normalisation has one mean and one std per feature")
        if list(self.reference_score_histogram.upper_edges) != list(SCORE_BUCKET_EDGES):
            raise ValueError("reference_score_histogram must use SCORE_BUCKET_EDGES")
        return self

    def check_serving_contract(self) -> None:
        """Refuse a card whose features are not the ones this code computes."""
        if tuple(self.feature_names) != features.FEATURE_NAMES:
            raise ModelError(
                f"model {self.version} expects features {self.feature_names}, but this worker "
                f"computes {list(features.FEATURE_NAMES)}: export the model with this version"
            )
        if self.feature_version != features.FEATURE_VERSION:
            raise ModelError(
                f"model {self.version} was trained on version {self.feature_version} of the "
                f"feature definitions; this worker computes version {features.FEATURE_VERSION}"
                " (see stream_app/features.py): retrain and export the model with this version"
            )
        if self.label_delay_days != features.LABEL_DELAY_DAYS:
            raise ModelError(
                f"model {self.version} was trained with a {self.label_delay_days}-day label "
                f"delay; the worker's features use {features.LABEL_DELAY_DAYS}"
            )

    def write(self, directory: Path) -> Path:
        """Write the card as ``model_card.json`` in ``directory``."""
        path = directory / CARD_FILE
        text = json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False)
        path.write_text(text + "\n", encoding="utf-8")
        return path


def load_card(directory: Path) -> ModelCard:
    """Read and validate a model directory's card; :class:`ModelError` says what is wrong."""
    path = directory / CARD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{directory} has no {CARD_FILE}: not a model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not readable JSON: {exc}") from exc
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "card"
        raise ModelError(f"{path}: {where}: {first['msg']}") from exc
    card.check_serving_contract()
    return card
