"""The offline commands' surface (train, evaluate, export, score-file): help, defaults, errors."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stream_app.cli import app, register_commands
from training import evaluation, thresholds
from training.commands.evaluate import evaluate_command
from training.commands.export import export_command
from training.commands.train import train_command
from training.export import PARITY_TOLERANCE
from training.gan import GanConfig
from training.sequence_model import ModelConfig
from training.train import AugmentConfig, TrainConfig

register_commands()
runner = CliRunner()


def _defaults(command: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(command).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("name", ["train", "evaluate", "export", "score-file"])
def test_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--data" in result.output


@pytest.mark.parametrize("command", [train_command, evaluate_command])
def test_option_defaults_are_the_configs_defaults(command: Any) -> None:
    # The options repeat the defaults as literals (so --help imports nothing heavy);
    # they must not drift from the dataclasses the commands build.
    defaults = _defaults(command)
    train, model, gan, augment = TrainConfig(), ModelConfig(), GanConfig(), AugmentConfig()
    assert defaults["sequence_length"] == train.sequence_length
    assert defaults["epochs"] == train.max_epochs
    assert defaults["patience"] == train.patience
    assert defaults["batch_size"] == train.batch_size
    assert defaults["learning_rate"] == train.learning_rate
    assert defaults["fraud_weight"] == train.fraud_weight
    assert defaults["seed"] == train.seed
    assert defaults["threads"] == train.threads
    assert defaults["device"] == train.device
    assert defaults["hidden_size"] == model.hidden_size
    assert defaults["augment"] == augment.mode.value
    assert defaults["augment_ratio"] == augment.ratio
    assert defaults["gan_steps"] == gan.generator_steps


def test_evaluate_defaults_are_the_protocol() -> None:
    defaults = _defaults(evaluate_command)
    assert defaults["start"] == evaluation.PREQUENTIAL_START
    assert defaults["single_split_start"] == evaluation.SINGLE_SPLIT_START
    assert defaults["folds"] == evaluation.N_FOLDS
    for delta in ("delta_train", "delta_delay", "delta_test"):
        assert defaults[delta] == evaluation.DELTA_DAYS


def test_train_defaults_are_the_threshold_rules() -> None:
    defaults = _defaults(train_command)
    assert defaults["review_cards_per_day"] == thresholds.DEFAULT_CARDS_PER_DAY
    assert defaults["decline_precision"] == thresholds.DEFAULT_MIN_PRECISION


def test_export_defaults_to_the_contracts_tolerance() -> None:
    assert _defaults(export_command)["parity_tolerance"] == PARITY_TOLERANCE


def test_a_bad_augment_mode_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", "--data", str(tmp_path / "x.parquet"), "--augment", "smote"]
    )
    assert result.exit_code == 2
    assert "--augment must be one of none, oversample, gan" in result.output


def test_a_missing_data_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "missing.parquet")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_evaluate_help_names_every_model_kind() -> None:
    result = runner.invoke(app, ["evaluate", "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    for kind in evaluation.MODEL_KINDS:
        assert kind in result.output


def test_an_unknown_model_is_a_clear_error_before_any_work(tmp_path: Path) -> None:
    # The data file does not exist: the model names are checked before it is read.
    result = runner.invoke(
        app, ["evaluate", "--data", str(tmp_path / "x.parquet"), "--models", "oracle,svm"]
    )
    assert result.exit_code == 2
    assert "unknown model 'svm'" in result.output and "oracle_label_delay" in result.output


def test_evaluate_runs_only_the_chosen_models(tmp_path: Path) -> None:
    # The two oracle bounds alone: no training, seconds on a small file.
    data, out = tmp_path / "tx.parquet", tmp_path / "reports"
    args = ["simulate", "--out", str(data), "--n-customers", "300", "--n-terminals", "600"]
    assert runner.invoke(app, [*args, "--n-days", "40", "--radius", "10"]).exit_code == 0
    evaluate = [
        "evaluate", "--data", str(data), "--out", str(out), "--start", "2018-04-10",
        "--folds", "2", "--single-split-start", "2018-04-03",
        "--models", "oracle_label_delay,oracle",
    ]  # fmt: skip
    result = runner.invoke(app, evaluate, terminal_width=200)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "benchmark.json").read_text())
    assert payload["settings"]["models"] == ["oracle_label_delay", "oracle"]
    summary = payload["prequential"]["summary"]
    for metric in evaluation.METRIC_NAMES:
        assert summary["oracle_label_delay"][metric]["mean"] >= summary["oracle"][metric]["mean"]
    markdown = (out / "benchmark.md").read_text()
    assert "| Oracle bound, our features" in markdown
    assert "| Oracle bound, any model (7-day label delay) |" in markdown
    assert "score_histograms.png" not in markdown  # no model scores: nothing to draw
    assert not (out / "score_histograms.png").exists()


def test_score_file_refuses_a_directory_without_a_model(tmp_path: Path) -> None:
    data = tmp_path / "tx.parquet"
    assert (
        runner.invoke(
            app, ["simulate", "--out", str(data), "--n-customers", "20", "--n-days", "3"]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "score-file",
            "--data",
            str(data),
            "--model",
            str(tmp_path),
            "--out",
            str(tmp_path / "s.csv"),
        ],
    )
    assert result.exit_code == 2
    assert "model_card.json" in result.output


@pytest.mark.parametrize("name", ["train", "evaluate", "export", "score-file"])
def test_help_needs_no_heavy_package(name: str) -> None:
    # `fraudstream <command> --help` must work where torch, pandas and sklearn are missing.
    code = (
        "import sys\n"
        "for heavy in ('torch', 'pandas', 'sklearn', 'xgboost', 'onnx', 'matplotlib'):\n"
        "    sys.modules[heavy] = None  # any import of them now fails\n"
        "from stream_app.cli import register_commands, app\n"
        "register_commands()\n"
        f"app([{name!r}, '--help'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--data" in result.stdout


def test_a_small_population_is_told_why_its_fraud_share_is_larger(tmp_path: Path) -> None:
    from training.commands.simulate import DEFAULT_CUSTOMERS
    from training.simulator import SimulatorConfig

    assert SimulatorConfig().n_customers == DEFAULT_CUSTOMERS
    small = ["simulate", "--out", str(tmp_path / "s.parquet"), "--n-customers", "200"]
    result = runner.invoke(app, [*small, "--n-terminals", "400", "--n-days", "10"])
    assert result.exit_code == 0, result.output
    assert "--compromised-customers-per-day" in result.output.split("written to")[1]
    full = ["simulate", "--out", str(tmp_path / "f.parquet"), "--n-days", "2"]
    result = runner.invoke(app, full)
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output
