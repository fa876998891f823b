"""``score-file`` on a labelled file says how good the scores are: AUC ROC, average
precision and card precision@100, as ``evaluate`` computes them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from training.evaluation import assess
from training.simulator import SimulatorConfig, simulate
from training.transactions import read_transactions, write_transactions

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "onnx_models" / "default"


def _score_file(data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [
        "score-file",
        "--data",
        str(data),
        "--model-dir",
        str(DEFAULT_MODEL),
        "--out",
        str(out),
    ]
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *command],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_labelled_file_gets_auc_ap_and_card_precision(tmp_path: Path) -> None:
    data = tmp_path / "tx.parquet"
    write_transactions(simulate(SimulatorConfig(n_customers=300, n_terminals=600, n_days=20)), data)
    out = tmp_path / "scores.parquet"
    done = _score_file(data, out)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(
        r"AUC ROC (\d\.\d{3}), average\s+precision (\d\.\d{3}), card\s+precision@100 (\d\.\d{3})",
        done.stdout,
    )
    assert found, done.stdout
    frame = read_transactions(data)
    scores = pd.read_parquet(out)["score"].to_numpy()
    expected = assess(
        frame["TX_DATETIME"].to_numpy(dtype="datetime64[D]").astype(np.int64),
        frame["CUSTOMER_ID"].to_numpy(),
        frame["TX_FRAUD"].to_numpy(),
        scores,
    )
    printed = [float(x) for x in found.groups()]
    wanted = [expected["auc_roc"], expected["average_precision"], expected["card_precision_at_100"]]
    assert printed == [round(x, 3) for x in wanted]
    assert printed[0] > 0.6  # the shipped model ranks simulated frauds well above chance


def test_a_file_without_frauds_gets_no_quality_line(tmp_path: Path) -> None:
    frame = simulate(SimulatorConfig(n_customers=50, n_terminals=100, n_days=5))
    frame = frame[frame["TX_FRAUD"] == 0]
    data = tmp_path / "tx.csv"
    write_transactions(frame, data)
    done = _score_file(data, tmp_path / "scores.csv")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "AUC" not in done.stdout


def test_without_model_dir_it_scores_with_the_workers_default_model_or_says_what_to_pass(
    tmp_path: Path,
) -> None:
    data = tmp_path / "tx.parquet"
    write_transactions(simulate(SimulatorConfig(n_customers=50, n_terminals=100, n_days=3)), data)
    command = [sys.executable, "-m", "stream_app.cli", "score-file", "--data", str(data)]
    root = DEFAULT_MODEL.parents[1]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "a.parquet")], cwd=root, capture_output=True,
        text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with_dir = _score_file(data, tmp_path / "b.parquet")
    assert with_dir.returncode == 0, with_dir.stderr
    assert pd.read_parquet(tmp_path / "a.parquet").equals(pd.read_parquet(tmp_path / "b.parquet"))

    elsewhere = subprocess.run(
        [*command, "--out", str(tmp_path / "c.parquet")], cwd=tmp_path, capture_output=True,
        text=True, timeout=180,
    )  # fmt: skip
    assert elsewhere.returncode == 2
    assert "pass --model-dir" in elsewhere.stderr and "onnx_models/default" in elsewhere.stderr
