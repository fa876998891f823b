"""``fraudstream export``: a trained model exported again, and the models it refuses.

A tiny model is trained once by ``fraudstream train`` (150 customers over 5 weeks, one
epoch: seconds), so the export runs on exactly what train writes. Real torch, real ONNX
Runtime, no mocks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tests.stream_app.models.test_contract as contract
from stream_app.cli import app, register_commands
from stream_app.models.card import CARD_FILE
from stream_app.models.scorer import OnnxScorer
from tests.training.test_shipped_weights import onnx_equals_pytorch
from training.export import WEIGHTS_FILE

register_commands()
runner = CliRunner()

# The model contract every shipped model keeps (tests/stream_app/models/test_contract.py),
# run here on an exported directory.
CONTRACT_CHECKS: tuple[Callable[[OnnxScorer], None], ...] = (
    contract.test_card_matches_the_features_and_the_graph,
    contract.test_outputs_are_probabilities,
    contract.test_scoring_is_deterministic,
    contract.test_batch_of_one_equals_batch_of_many,
    contract.test_the_card_records_onnx_equal_to_pytorch,
    onnx_equals_pytorch,
)


def _run(*args: str | Path) -> str:
    result = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def _refused(out: Path, *args: str | Path) -> str:
    """Run a command that must fail, leaving nothing at ``out`` nor beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = runner.invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no half-written staging directory either
    return result.output


def _card(directory: Path) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((directory / CARD_FILE).read_text())
    return card


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A transactions file and the model directory ``fraudstream train`` wrote from it."""
    root = tmp_path_factory.mktemp("trained")
    data, model = root / "tx.parquet", root / "model"
    _run(
        "simulate", "--out", data, "--n-customers", "150", "--n-terminals", "300",
        "--n-days", "35", "--radius", "10",
    )  # fmt: skip
    _run(
        "train", "--data", data, "--out", model, "--train-end", "2018-04-21",
        "--train-days", "7", "--epochs", "1", "--hidden-size", "8", "--threads", "1",
    )  # fmt: skip
    return data, model


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model exported again by ``fraudstream export``."""
    out = tmp_path_factory.mktemp("exported") / "model"
    output = _run("export", "--model", trained[1], "--out", out)
    assert "ONNX parity" in output
    return out


def test_export_reproduces_the_card_train_wrote(trained: tuple[Path, Path], exported: Path) -> None:
    before, after = _card(trained[1]), _card(exported)
    assert before.pop("created_at") and after.pop("created_at")
    # PyTorch's probe scores may round differently with another thread count (the shipped
    # model's differ by 7e-9 when exported again on this machine).
    probes = [np.asarray(c["parity"].pop("probe_scores")) for c in (before, after)]
    np.testing.assert_allclose(probes[1], probes[0], rtol=0, atol=1e-6)
    # The same graph (hash), version, thresholds, training record and parity record, on the
    # same parity sequences: train and export share one code path.
    assert after == before
    assert after["parity"]["sequences"] >= 1000
    weights = [torch.load(d / WEIGHTS_FILE, weights_only=True) for d in (trained[1], exported)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("check", CONTRACT_CHECKS, ids=[c.__name__ for c in CONTRACT_CHECKS])
def test_the_exported_model_keeps_the_model_contract(
    exported: Path, check: Callable[[OnnxScorer], None]
) -> None:
    check(OnnxScorer(exported))


def test_a_model_that_fails_parity_is_refused_and_nothing_is_written(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    parity = _card(trained[1])["parity"]
    worst = max(parity["max_abs_diff_batch_1"], parity["max_abs_diff_batch_n"])
    # ONNX Runtime's LSTM and sigmoid round differently from torch's: never bit-identical on
    # thousands of sequences, so half the measured difference is a tolerance it cannot meet.
    assert 0.0 < worst <= 1e-5
    out = tmp_path / "out" / "model"
    output = _refused(
        out, "export", "--model", trained[1], "--out", out, "--parity-tolerance", f"{worst / 2:g}"
    )
    assert "ONNX differs from PyTorch" in output and "the model was not written" in output


def test_broken_weights_are_refused_and_nothing_is_written(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    shutil.copytree(trained[1], source)
    state = torch.load(source / WEIGHTS_FILE, weights_only=True)
    state["head.3.weight"][0, 0] = float("nan")  # as a diverged training run leaves them
    torch.save(state, source / WEIGHTS_FILE)
    out = tmp_path / "out" / "model"
    output = _refused(out, "export", "--model", source, "--out", out)
    assert "NaN or infinity" in output and "the model was not written" in output


def test_a_looser_tolerance_than_the_contract_is_refused(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "model"
    output = _refused(
        out, "export", "--model", trained[1], "--out", out, "--parity-tolerance", "1e-3"
    )
    assert "between 0 and 1e-05" in output


def test_parity_data_must_be_the_training_file(trained: tuple[Path, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.parquet"
    _run("simulate", "--out", other, "--n-customers", "20", "--n-days", "3")
    out = tmp_path / "out" / "model"
    output = _refused(out, "export", "--model", trained[1], "--out", out, "--data", other)
    assert "is not the file model" in output and "--data" in output


def test_a_directory_without_weights_is_refused(tmp_path: Path, exported: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(exported, source)
    (source / WEIGHTS_FILE).unlink()
    out = tmp_path / "out" / "model"
    output = _refused(out, "export", "--model", source, "--out", out)
    assert f"has no {WEIGHTS_FILE}" in output


def test_a_card_from_before_the_split_was_recorded_exports_the_same(
    trained: tuple[Path, Path], exported: Path, tmp_path: Path
) -> None:
    # The shipped default model's card has no training.split: export rebuilds train's layout
    # from the training days and the test period, so the parity sequences are the same.
    source = tmp_path / "source"
    shutil.copytree(trained[1], source)
    card = _card(source)
    del card["training"]["split"]
    (source / CARD_FILE).write_text(json.dumps(card))
    out = tmp_path / "out"
    _run("export", "--model", source, "--out", out)
    assert _card(out)["parity"] == _card(exported)["parity"]
