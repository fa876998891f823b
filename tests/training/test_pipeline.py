"""The whole offline pipeline through the CLI on a small simulated file:
simulate -> evaluate -> train (with the GAN) -> score-file.

Small on purpose (about a minute on 2 idle cores): few customers, 9 weeks, 2 epochs. The
assertions are that every step writes what it promises and that the models are far above
random, not benchmark figures (those are in training/reports/).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from stream_app.cli import app, register_commands
from stream_app.models.scorer import OnnxScorer, file_sha256
from training.evaluation import MODEL_KINDS

pytestmark = pytest.mark.slow

register_commands()
runner = CliRunner()
# One thread: on data this small a second one only waits, and CI machines are shared.
FAST = ["--epochs", "2", "--patience", "1", "--gan-steps", "60", "--threads", "1"]


def _run(*args: str) -> str:
    result = runner.invoke(app, list(args), terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "tx.parquet"
    _run(
        "simulate", "--out", str(path), "--n-customers", "700", "--n-terminals", "1400",
        "--n-days", "63", "--radius", "10",
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def fraud_rate(data: Path) -> float:
    return float(pd.read_parquet(data)["TX_FRAUD"].mean())


def test_evaluate_writes_the_benchmark(data: Path, fraud_rate: float, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    _run(
        "evaluate", "--data", str(data), "--out", str(out), "--start", "2018-05-13",
        "--folds", "2", "--single-split-start", "2018-05-06", "--augment", "gan", *FAST,
    )  # fmt: skip
    payload = json.loads((out / "benchmark.json").read_text())
    summary = payload["prequential"]["summary"]
    assert set(summary) == set(MODEL_KINDS)  # every family, baseline and bound by default
    for model in ("lstm", "logistic_regression", "xgboost"):
        assert summary[model]["auc_roc"]["mean"] > 0.75
        assert summary[model]["average_precision"]["mean"] > 5 * fraud_rate
    assert len(payload["prequential"]["folds"]) == 2
    fidelity = payload["prequential"]["folds"][0]["details"]["lstm"]["gan_fidelity"]
    assert 0.0 <= fidelity["c2st_auc"] <= 1.0 and len(fidelity["ks"]) == 20
    markdown = (out / "benchmark.md").read_text()
    assert payload["command"] in markdown and "--folds 2" in payload["command"]
    assert "| Oracle bound, any model (7-day label delay) |" in markdown
    for plot in ("precision_recall.png", "score_histograms.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_augment_study_compares_the_three_modes(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    _run(
        "evaluate", "--data", str(data), "--out", str(out), "--start", "2018-05-13",
        "--folds", "1", "--augment-study", "--seeds", "0", "--epochs", "1",
        "--gan-steps", "30", "--threads", "1",
    )  # fmt: skip
    payload = json.loads((out / "augment_study.json").read_text())
    assert set(payload["modes"]) == {"none", "oversample", "gan"}
    assert payload["winner"] in payload["modes"]
    assert "gan_fidelity" in payload
    assert "| gan |" in (out / "augment_study.md").read_text()


def test_train_then_score_file(data: Path, fraud_rate: float, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    _run(
        "train", "--data", str(data), "--out", str(model_dir), "--train-end", "2018-05-19",
        "--train-days", "14", "--augment", "gan", *FAST,
    )  # fmt: skip
    scorer = OnnxScorer(model_dir)
    card = scorer.card
    assert card.training["data_sha256"] == file_sha256(data)
    assert card.training["train_days"] == "2018-05-06..2018-05-19"
    assert card.training["validation_days"] == "2018-04-29..2018-05-05"
    assert card.gan_fidelity is not None and "c2st_auc" in card.gan_fidelity
    assert card.metrics["test_period"] == "2018-05-27..2018-06-02"
    assert card.metrics["test"]["average_precision"] > 5 * fraud_rate
    assert card.thresholds.review <= card.thresholds.decline
    assert "cards a day" in card.thresholds.review_rule
    assert (model_dir / "model.pt").is_file()

    scores_path = tmp_path / "scores.csv"
    output = _run(
        "score-file", "--data", str(data), "--model", str(model_dir), "--out", str(scores_path)
    )
    assert "transactions scored" in output
    scores = pd.read_csv(scores_path)
    truth = pd.read_parquet(data)
    assert len(scores) == len(truth)
    assert (scores["TRANSACTION_ID"].to_numpy() == truth["TRANSACTION_ID"].to_numpy()).all()
    assert set(scores["decision"]) <= {"approve", "review", "decline"}
    assert roc_auc_score(truth["TX_FRAUD"], scores["score"]) > 0.75
    assert average_precision_score(truth["TX_FRAUD"], scores["score"]) > 5 * fraud_rate
    assert np.all(scores["model_version"] == card.version)
