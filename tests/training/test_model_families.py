"""Every model family behind one interface: trained by ``fraudstream train --family``,
exported with the same parity check and card, keeping the one model contract, and compared
by ``fraudstream evaluate`` on the protocol.

A tiny model of each family is trained on one small simulated file (150 customers over 5
weeks, one epoch: seconds each). Real torch, real ONNX Runtime, no mocks. The worker serving
a family other than the LSTM is tested in ``tests/stream_app/worker/test_models.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_app.models.card import load_card
from stream_app.models.scorer import OnnxScorer
from tests.training.test_export import CONTRACT_CHECKS, _run
from training.export import load_trained
from training.families import FAMILIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("families") / "tx.parquet"
    _run(
        "simulate", "--out", path, "--n-customers", "150", "--n-terminals", "300",
        "--n-days", "35", "--radius", "10",
    )  # fmt: skip
    return path


def train_family(data: Path, family: str, out: Path) -> Path:
    """``fraudstream train --family`` on ``data``: one epoch of a small network."""
    _run(
        "train", "--data", data, "--out", out, "--family", family, "--train-end",
        "2018-04-21", "--train-days", "7", "--epochs", "1", "--hidden-size", "8",
        "--threads", "1",
    )  # fmt: skip
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_exports_and_keeps_the_model_contract(
    data: Path, family: str, tmp_path: Path
) -> None:
    model_dir = train_family(data, family, tmp_path / family)
    card = load_card(model_dir)
    assert card.training["config"]["model"]["family"] == family
    assert card.architecture.startswith(f"{family} sequence scorer")
    parity = card.parity
    assert max(parity["max_abs_diff_batch_1"], parity["max_abs_diff_batch_n"]) <= 1e-5
    scorer = OnnxScorer(model_dir)  # the worker's serving checks
    for check in CONTRACT_CHECKS:
        check(scorer)
    model, _ = load_trained(model_dir)
    assert model.config.family == family


def test_an_unknown_family_names_the_choices(data: Path, tmp_path: Path) -> None:
    from stream_app.cli import app
    from tests.training.test_export import runner

    result = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--family", "rnn"]
    )
    assert result.exit_code == 2, result.output
    assert "rnn" in result.output and "lstm_attention" in result.output
    assert not (tmp_path / "m").exists()


def test_evaluate_compares_families_on_the_protocol(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    _run(
        "evaluate", "--data", data, "--out", out, "--start", "2018-04-15", "--folds", "1",
        "--single-split-start", "2018-04-10", "--models", "ffnn,transformer,xgboost",
        "--epochs", "1", "--hidden-size", "8", "--threads", "1",
    )  # fmt: skip
    payload = json.loads((out / "benchmark.json").read_text())
    summary = payload["prequential"]["summary"]
    assert {"ffnn", "transformer", "xgboost"} <= set(summary)
    markdown = (out / "benchmark.md").read_text()
    assert "Feed-forward network (ours)" in markdown
    assert "Transformer encoder (ours)" in markdown
    # Each family's serving cost, measured on its ONNX graph, and the plot against AP.
    for family in ("ffnn", "transformer"):
        cost = payload["prequential"]["folds"][0]["details"][family]["onnx_us_per_event"]
        assert 0 < cost["batch_1000"] < cost["batch_1"], cost
    assert "| Transformer encoder (ours) |" in markdown.split("## What each costs")[1]
    assert (out / "ap_against_cost.png").read_bytes()[:4] == b"\x89PNG"
