"""``python -m training.calibration``: Brier score, ECE and reliability curve of a model on
its validation period, checked against ``score-file`` and scikit-learn on the same days."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss

from stream_app.models.card import load_card
from tests.training.test_export import _run
from tests.training.test_model_families import train_family
from training.calibration import reliability
from training.dataset import Period

pytestmark = pytest.mark.slow


def test_the_validation_period_calibration_agrees_with_score_file(tmp_path: Path) -> None:
    data = tmp_path / "tx.parquet"
    _run(
        "simulate", "--out", data, "--n-customers", "150", "--n-terminals", "300",
        "--n-days", "35", "--radius", "10",
    )  # fmt: skip
    model = train_family(data, "lstm", tmp_path / "model")
    out = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, "-m", "training.calibration", "--model-dir", str(model),
         "--data", str(data), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "calibration.json").read_text())
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert report["command"] in (out / "calibration.md").read_text()

    _run("score-file", "--data", data, "--model-dir", model, "--out", tmp_path / "s.parquet")
    scored = pd.read_parquet(tmp_path / "s.parquet")
    frame = pd.read_parquet(data)[["TRANSACTION_ID", "TX_DATETIME", "TX_FRAUD"]]
    joined = frame.merge(scored[["TRANSACTION_ID", "score"]], on="TRANSACTION_ID")
    period = Period.parse(str(load_card(model).training["validation_days"]))
    day = joined["TX_DATETIME"].to_numpy("datetime64[D]").astype(np.int64)
    inside = joined[(day >= period.first_day) & (day <= period.last_day)]
    assert report["transactions"] == len(inside)
    assert report["frauds"] == int(inside["TX_FRAUD"].sum())
    expected = brier_score_loss(inside["TX_FRAUD"], inside["score"])
    assert report["brier"] == pytest.approx(expected, abs=1e-6)
    assert sum(b["transactions"] for b in report["bins"]) == len(inside)


def test_a_calibrated_scorer_has_a_small_ece_and_a_shifted_one_a_large_one() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 0.2, 200_000)
    y = (rng.random(len(p)) < p).astype(np.int64)
    assert reliability(p, y)["ece"] < 0.005
    assert reliability(np.minimum(p * 3, 1.0), y)["ece"] > 0.1
