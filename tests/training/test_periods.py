"""``train`` and ``evaluate`` fit their default periods to the data file, and a period
that does not fit names the option and a value that works (tried here: it does)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stream_app.cli import app, register_commands
from training.evaluation import PREQUENTIAL_START, SINGLE_SPLIT_START
from training.periods import FileDays, evaluate_periods, train_periods

runner = CliRunner()
register_commands()


@pytest.fixture(scope="module")
def sixty_days(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a new user simulates first: 500 customers, 60 days (issue 14)."""
    data = tmp_path_factory.mktemp("periods") / "tx.parquet"
    args = ["simulate", "--out", str(data), "--n-customers", "500", "--n-days", "60"]
    assert runner.invoke(app, args).exit_code == 0
    return data


def _suggested(output: str, option: str) -> str:
    found = re.search(rf"use {option} (\S+)", output)
    assert found, output
    return found.group(1)


@pytest.mark.slow
def test_train_on_a_short_file_with_its_defaults_then_with_the_suggested_value(
    sixty_days: Path, tmp_path: Path
) -> None:
    quick = ["--epochs", "1", "--threads", "1"]
    done = runner.invoke(
        app, ["train", "--data", str(sixty_days), "--out", str(tmp_path / "m1"), *quick]
    )
    assert done.exit_code == 0, done.output
    assert (tmp_path / "m1" / "model_card.json").exists()
    # A given --train-end past the file: exit 2, the option, and a value that works.
    args = ["train", "--data", str(sixty_days), "--out", str(tmp_path / "m2"), *quick]
    done = runner.invoke(app, [*args, "--train-end", "2018-08-21"])
    assert done.exit_code == 2
    value = _suggested(done.output, "--train-end")
    done = runner.invoke(app, [*args, "--train-end", value])
    assert done.exit_code == 0, done.output


@pytest.mark.slow
def test_evaluate_on_a_short_file_fits_its_folds_and_suggests_a_value(
    sixty_days: Path, tmp_path: Path
) -> None:
    args = ["evaluate", "--data", str(sixty_days), "--models", "logistic_regression"]
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    assert "periods fitted to the file" in done.output
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--folds", "12"])
    assert done.exit_code == 2
    folds = _suggested(done.output, "--folds")
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--folds", folds])
    assert done.exit_code == 0, done.output


def test_the_handbooks_file_keeps_the_handbooks_periods() -> None:
    handbook = FileDays(dt.date(2018, 4, 1), dt.date(2018, 9, 30))
    fitted = train_periods(handbook, "2018-08-21", 56, 7, 7, given_end=False, given_days=False)
    assert (fitted.train_end, fitted.train_days) == ("2018-08-21", 56)
    folds = evaluate_periods(
        handbook, PREQUENTIAL_START, 4, SINGLE_SPLIT_START, 7, 7, 7, given=set()
    )
    assert (folds.start, folds.folds, folds.single_split_start) == (
        PREQUENTIAL_START,
        4,
        SINGLE_SPLIT_START,
    )


def test_a_file_too_short_for_any_period_says_what_to_change() -> None:
    short = FileDays(dt.date(2018, 4, 1), dt.date(2018, 4, 10))
    with pytest.raises(Exception, match=r"--valid-days \d+ --test-days \d+"):
        train_periods(short, "2018-08-21", 56, 7, 7, given_end=False, given_days=False)
    with pytest.raises(Exception, match=r"fraudstream simulate --n-days"):
        evaluate_periods(short, "2018-08-15", 4, "2018-07-25", 7, 7, 7, given=set())
