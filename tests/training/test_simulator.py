"""The transaction simulator (training/simulator.py) and its ``fraudstream simulate`` command."""

from __future__ import annotations

import dataclasses
import doctest
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import typer
from typer.testing import CliRunner, Result

from stream_app.cli import app, register_commands
from stream_app.errors import FraudStreamError
from training import simulator
from training.simulator import STAGES, SimulationSummary, SimulatorConfig, simulate, summarise
from training.transactions import (
    TRANSACTION_COLUMNS,
    TRANSACTION_DTYPES,
    read_transactions,
    write_transactions,
)

# Small enough to run in well under a second, dense enough that every scenario fires.
SMALL = SimulatorConfig(n_customers=300, n_terminals=600, n_days=40, radius=10.0)

# Section 3.2 of the Fraud Detection Handbook: its dataset at these very defaults.
PUBLISHED_ROWS = 1_754_155
PUBLISHED_FRAUDS = 14_681
PUBLISHED_SCENARIOS = {1: 973, 2: 9_077, 3: 4_631}


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return simulate(SMALL)


def only(**changes: object) -> SimulatorConfig:
    """SMALL with every fraud scenario off except those switched on in ``changes``."""
    quiet = dataclasses.replace(
        SMALL,
        amount_threshold=float("inf"),
        compromised_terminals_per_day=0,
        compromised_customers_per_day=0,
    )
    return dataclasses.replace(quiet, **changes)  # type: ignore[arg-type]


# --- the table's shape ------------------------------------------------------------------


def test_columns_dtypes_and_order(small: pd.DataFrame) -> None:
    assert tuple(small.columns) == TRANSACTION_COLUMNS
    assert {column: str(dtype) for column, dtype in small.dtypes.items()} == TRANSACTION_DTYPES
    assert len(small) > 10_000


def test_rows_sorted_by_time_then_customer_and_numbered_in_that_order(
    small: pd.DataFrame,
) -> None:
    key = small[["TX_TIME_SECONDS", "CUSTOMER_ID"]].to_numpy()
    assert np.all(np.lexsort((key[:, 1], key[:, 0])) == np.arange(len(small)))
    assert (small["TRANSACTION_ID"].to_numpy() == np.arange(len(small))).all()


def test_times_are_consistent_and_inside_their_day(small: pd.DataFrame) -> None:
    seconds = small["TX_TIME_SECONDS"]
    assert (small["TX_TIME_DAYS"] == seconds // 86_400).all()
    time_of_day = seconds % 86_400
    assert time_of_day.min() > 0  # the reference keeps 0 < t < 86 400
    expected = pd.Timestamp("2018-04-01") + pd.to_timedelta(seconds, unit="s")
    assert (small["TX_DATETIME"] == expected).all()
    assert small["TX_TIME_DAYS"].between(0, SMALL.n_days - 1).all()
    # Times of day centre on noon (N(43 200, 20 000) truncated to the day).
    assert abs(time_of_day.mean() - 43_200) < 1_000


def test_amounts_are_non_negative_cents(small: pd.DataFrame) -> None:
    amounts = small["TX_AMOUNT"].to_numpy()
    assert amounts.min() >= 0
    # About 2 % of N(mean, mean / 2) draws are negative; they are redrawn from
    # U(0, 2 mean), not clipped, so zero amounts stay exceptional.
    assert (amounts == 0).mean() < 1e-3
    # Each amount is exactly the float its two-decimal text reads back as (scenario 3's
    # multiplied amounts included), so text exports show cents and nothing more.
    as_cents = np.array([float(f"{amount:.2f}") for amount in amounts])
    assert (amounts == as_cents).all()
    assert (small["TX_FRAUD_SCENARIO"] == 3).any()


def test_ids_stay_in_range(small: pd.DataFrame) -> None:
    assert small["CUSTOMER_ID"].between(0, SMALL.n_customers - 1).all()
    assert small["TERMINAL_ID"].between(0, SMALL.n_terminals - 1).all()


# --- determinism ---------------------------------------------------------------------


def test_same_seed_same_table(small: pd.DataFrame) -> None:
    pdt.assert_frame_equal(simulate(SMALL), small)


def test_other_seed_other_table(small: pd.DataFrame) -> None:
    other = simulate(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert len(other) != len(small) or not other.equals(small)


def test_progress_reports_every_stage_in_order() -> None:
    seen: list[str] = []
    simulate(dataclasses.replace(SMALL, n_days=3), seen.append)
    assert seen == list(STAGES)


# --- terminals in range --------------------------------------------------------------


@pytest.mark.parametrize("radius", [0.7, 3.0, 5.0, 7.3, 40.0, 150.0])
def test_terminals_in_range_match_brute_force(radius: float) -> None:
    rng = np.random.default_rng(42)
    customers = rng.uniform(0, 100, (200, 2))
    terminals = rng.uniform(0, 100, (500, 2))
    offsets, ids = simulator._terminals_in_range(
        customers[:, 0], customers[:, 1], terminals[:, 0], terminals[:, 1], radius
    )
    distance = np.linalg.norm(customers[:, None, :] - terminals[None, :, :], axis=2)
    for customer in range(len(customers)):
        expected = np.flatnonzero(distance[customer] < radius)
        assert ids[offsets[customer] : offsets[customer + 1]].tolist() == expected.tolist()


def test_customers_use_only_terminals_in_range() -> None:
    # One terminal, a small radius: most customers have none in range and never transact.
    df = simulate(only(n_terminals=1, radius=8.0))
    assert (df["TERMINAL_ID"] == 0).all()
    # About pi * 8² / 100² = 2 % of customers live near it (edge effects make it fewer).
    assert 0 < df["CUSTOMER_ID"].nunique() < SMALL.n_customers * 0.06


# --- fraud scenarios -------------------------------------------------------------------


def test_fraud_flag_is_set_exactly_for_scenarios(small: pd.DataFrame) -> None:
    assert (small["TX_FRAUD"] == (small["TX_FRAUD_SCENARIO"] > 0)).all()
    assert set(small["TX_FRAUD_SCENARIO"].unique()) == {0, 1, 2, 3}


def test_every_amount_above_threshold_is_fraud(small: pd.DataFrame) -> None:
    above = small["TX_AMOUNT"] > SMALL.amount_threshold
    assert above.any()
    assert (small.loc[above, "TX_FRAUD"] == 1).all()
    # Scenario 1 marks nothing else; a later scenario may relabel, never unmark.
    assert (small.loc[small["TX_FRAUD_SCENARIO"] == 1, "TX_AMOUNT"] > SMALL.amount_threshold).all()


def test_scenario_one_alone_is_exactly_the_threshold() -> None:
    df = simulate(only(amount_threshold=150.0))
    assert ((df["TX_AMOUNT"] > 150.0) == (df["TX_FRAUD_SCENARIO"] == 1)).all()
    assert set(df["TX_FRAUD_SCENARIO"].unique()) == {0, 1}


def test_compromised_terminal_window_is_day_to_day_plus_length_exclusive() -> None:
    # Two terminals, both drawn every day: each day d in 0 .. n_days-2 compromises both for
    # [d, d + 1), so every transaction is fraud except those on the last day (no draw then).
    config = only(
        n_terminals=2, radius=200.0, compromised_terminals_per_day=2, terminal_compromise_days=1
    )
    df = simulate(config)
    last_day = df["TX_TIME_DAYS"] == config.n_days - 1
    assert last_day.any()
    assert (df.loc[~last_day, "TX_FRAUD_SCENARIO"] == 2).all()
    assert (df.loc[last_day, "TX_FRAUD"] == 0).all()

    # A window of 2 days from day n_days-2 reaches the last day.
    df = simulate(dataclasses.replace(config, terminal_compromise_days=2))
    assert (df["TX_FRAUD_SCENARIO"] == 2).all()


def test_compromised_terminal_stays_compromised_for_the_whole_window() -> None:
    config = only(
        n_terminals=30, radius=20.0, compromised_terminals_per_day=1, terminal_compromise_days=10
    )
    df = simulate(config)
    # The label is a property of (terminal, day): all or none of a terminal's day is fraud.
    per_day = df.groupby(["TERMINAL_ID", "TX_TIME_DAYS"])["TX_FRAUD"].agg(["min", "max"])
    assert (per_day["min"] == per_day["max"]).all()
    # Once compromised on day d, all of a terminal's transactions on d .. d+9 are fraud...
    frauds = df[df["TX_FRAUD"] == 1]
    first_fraud_day = frauds.groupby("TERMINAL_ID")["TX_TIME_DAYS"].min()
    assert len(first_fraud_day) > 5
    ended = False
    for terminal, first in first_fraud_day.items():
        mine = df[df["TERMINAL_ID"] == terminal]
        assert (mine.loc[mine["TX_TIME_DAYS"].between(first, first + 9), "TX_FRAUD"] == 1).all()
        # ...and, unless drawn again, genuine afterwards.
        ended |= bool((mine.loc[mine["TX_TIME_DAYS"] > first + 9, "TX_FRAUD"] == 0).any())
    assert ended
    # One draw a day: on each day at most as many terminals are in fraud as windows overlap.
    terminals_per_day = frauds.groupby("TX_TIME_DAYS")["TERMINAL_ID"].nunique()
    assert terminals_per_day.max() <= 10


def test_compromised_customers_lose_a_third_of_their_window_multiplied() -> None:
    # Every customer drawn every day, for one day: day d's pool is all of day d's
    # transactions, int(n / 3) of them become fraud; nothing is drawn on the last day.
    base = only(n_customers=3, radius=200.0, n_days=60, compromised_customers_per_day=3)
    base = dataclasses.replace(base, customer_compromise_days=1)
    multiplied = simulate(base)
    untouched = simulate(dataclasses.replace(base, customer_fraud_amount_factor=1.0))

    per_day = multiplied.groupby("TX_TIME_DAYS").agg(
        rows=("TX_FRAUD", "size"), frauds=("TX_FRAUD", "sum")
    )
    expected = (per_day["rows"] // 3).where(per_day.index < base.n_days - 1, 0)
    assert (per_day["frauds"] == expected).all()
    assert per_day["frauds"].sum() > 50

    # Same draws either way (the factor does not touch the random stream): frauds are
    # exactly x5, genuine amounts unchanged.
    pdt.assert_series_equal(multiplied["TX_FRAUD"], untouched["TX_FRAUD"])
    fraud = multiplied["TX_FRAUD"] == 1
    assert np.allclose(
        multiplied.loc[fraud, "TX_AMOUNT"], np.round(untouched.loc[fraud, "TX_AMOUNT"] * 5, 2)
    )
    assert (multiplied.loc[~fraud, "TX_AMOUNT"] == untouched.loc[~fraud, "TX_AMOUNT"]).all()


def test_overlapping_customer_windows_multiply_twice() -> None:
    config = only(n_customers=3, radius=200.0, compromised_customers_per_day=3)
    config = dataclasses.replace(config, customer_compromise_days=2)
    multiplied = simulate(config)
    untouched = simulate(dataclasses.replace(config, customer_fraud_amount_factor=1.0))
    fraud = (multiplied["TX_FRAUD"] == 1).to_numpy()
    ratio = multiplied["TX_AMOUNT"].to_numpy()[fraud] / untouched["TX_AMOUNT"].to_numpy()[fraud]
    ratio = ratio[untouched["TX_AMOUNT"].to_numpy()[fraud] > 1.0]  # cents rounding aside
    assert np.all(np.isclose(ratio, 5, atol=0.01) | np.isclose(ratio, 25, atol=0.01))
    assert np.isclose(ratio, 25, atol=0.01).any()


def test_later_scenarios_override_earlier_labels() -> None:
    # Both terminals compromised every day: scenario 2 relabels every amount > threshold
    # except on the last day, and scenario 3 relabels some of those in turn.
    config = dataclasses.replace(
        SMALL, n_terminals=2, radius=200.0, amount_threshold=60.0, terminal_compromise_days=1
    )
    df = simulate(config)
    untouched = simulate(dataclasses.replace(config, customer_fraud_amount_factor=1.0))
    above = untouched["TX_AMOUNT"] > 60.0  # amounts before scenario 3 multiplied any
    last_day = df["TX_TIME_DAYS"] == config.n_days - 1
    not_3 = df["TX_FRAUD_SCENARIO"] != 3
    # No terminal draw covers the last day: scenario 1 shows there...
    assert ((df["TX_FRAUD_SCENARIO"] == 1) == above)[last_day & not_3].all()
    assert (above & last_day & not_3).any()
    # ...and nowhere else: scenario 2 relabelled it, and scenario 3 some of those in turn.
    assert (above & ~last_day).any()
    assert set(df.loc[~last_day, "TX_FRAUD_SCENARIO"].unique()) == {2, 3}
    assert (df.loc[above & ~last_day, "TX_FRAUD_SCENARIO"] == 3).any()


def test_window_helper_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    keys, days = rng.integers(0, 20, 3_000), rng.integers(0, 50, 3_000)
    event_keys, event_days = rng.integers(0, 20, 40), rng.integers(0, 49, 40)
    for length in (0, 1, 5, 28):
        fast = simulator._in_window(keys, days, event_keys, event_days, length)
        slow = [
            any(
                k == ek and ed <= d < ed + length
                for ek, ed in zip(event_keys, event_days, strict=True)
            )
            for k, d in zip(keys, days, strict=True)
        ]
        assert fast.tolist() == slow


# --- summary ---------------------------------------------------------------------------


def test_summary_counts_final_labels() -> None:
    frame = pd.DataFrame({"TX_FRAUD": [0, 1, 1, 1, 0], "TX_FRAUD_SCENARIO": [0, 3, 3, 1, 0]})
    assert summarise(frame) == SimulationSummary(
        rows=5, frauds=3, fraud_rate=0.6, scenario_counts={1: 1, 2: 0, 3: 2}
    )
    empty = summarise(frame.iloc[:0])
    assert (empty.rows, empty.frauds, empty.fraud_rate) == (0, 0, 0.0)


def test_docstring_examples_hold() -> None:
    failures, tried = doctest.testmod(simulator)
    assert tried > 0
    assert failures == 0


# --- files -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tx.parquet", "tx.csv", "TX.CSV"])
def test_round_trip(small: pd.DataFrame, tmp_path: Path, name: str) -> None:
    path = tmp_path / "nested" / "dir" / name
    write_transactions(small, path)
    assert path.is_file()
    pdt.assert_frame_equal(read_transactions(path), small)


def test_file_format_follows_the_extension(small: pd.DataFrame, tmp_path: Path) -> None:
    write_transactions(small.head(3), tmp_path / "tx.csv")
    assert (tmp_path / "tx.csv").read_text().startswith(",".join(TRANSACTION_COLUMNS))
    write_transactions(small.head(3), tmp_path / "tx.parquet")
    assert (tmp_path / "tx.parquet").read_bytes()[:4] == b"PAR1"


@pytest.mark.parametrize("name", ["tx.txt", "tx", "tx.parquet.gz"])
def test_unknown_extension_is_a_clear_error(small: pd.DataFrame, tmp_path: Path, name: str) -> None:
    with pytest.raises(FraudStreamError, match=r"\.parquet or \.csv"):
        write_transactions(small, tmp_path / name)
    assert not (tmp_path / name).exists()
    with pytest.raises(FraudStreamError, match=r"\.parquet or \.csv"):
        read_transactions(tmp_path / name)


def test_reading_a_table_without_the_columns_names_them(
    small: pd.DataFrame, tmp_path: Path
) -> None:
    path = tmp_path / "partial.parquet"
    small.drop(columns=["TX_FRAUD", "TERMINAL_ID"]).to_parquet(path)
    with pytest.raises(FraudStreamError, match="TERMINAL_ID, TX_FRAUD"):
        read_transactions(path)


def test_reading_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FraudStreamError, match="does not exist"):
        read_transactions(tmp_path / "absent.csv")


# --- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_customers": -1}, "n_customers must be at least 1"),
        ({"n_terminals": 0}, "n_terminals must be at least 1"),
        ({"n_days": 0}, "n_days must be at least 1"),
        ({"radius": 0.0}, "radius"),
        ({"radius": float("nan")}, "radius"),
        ({"seed": -3}, "seed must not be negative"),
        ({"compromised_terminals_per_day": -1}, "compromised_terminals_per_day"),
        ({"compromised_terminals_per_day": 601}, "exceeds n_terminals"),
        ({"compromised_customers_per_day": 301}, "exceeds n_customers"),
        ({"terminal_compromise_days": -1}, "terminal_compromise_days"),
        ({"customer_compromise_days": -1}, "customer_compromise_days"),
        ({"customer_fraud_fraction": 1.5}, "customer_fraud_fraction"),
        ({"customer_fraud_amount_factor": -2.0}, "customer_fraud_amount_factor"),
        ({"amount_threshold": float("nan")}, "amount_threshold"),
        ({"start_date": "not a date"}, "start_date"),
        ({"start_date": "2018-04-01T00:00:00+02:00"}, "time zone"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(FraudStreamError, match=message):
        dataclasses.replace(SMALL, **changes)  # type: ignore[arg-type]


# --- command line ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fraudstream() -> Callable[[list[str]], Result]:
    """Run ``fraudstream ARGS...`` on the real application, output 200 columns wide."""
    if not any(command.name == "simulate" for command in app.registered_commands):
        register_commands()
    # Nested under a throwaway parent, `simulate` stays a subcommand even while it is the
    # application's only command (Typer would otherwise promote it to the root command).
    shell = typer.Typer()
    shell.add_typer(app)

    def run(args: list[str]) -> Result:
        return CliRunner().invoke(shell, ["fraudstream", *args], env={"COLUMNS": "200"})

    return run


def test_cli_help_lists_every_setting(fraudstream: Callable[[list[str]], Result]) -> None:
    result = fraudstream(["simulate", "--help"])
    assert result.exit_code == 0, result.output
    for field in dataclasses.fields(SimulatorConfig):
        assert "--" + field.name.replace("_", "-") in result.output
    assert "--out" in result.output
    assert "Fraud scenarios" in result.output


def test_cli_defaults_equal_the_config_defaults(fraudstream: Callable[[list[str]], Result]) -> None:
    command = typer.main.get_group(app).commands["simulate"]
    options = {param.name: param.default for param in command.params}
    defaults = {field.name: field.default for field in dataclasses.fields(SimulatorConfig)}
    assert {name: options[name] for name in defaults} == defaults


def test_cli_writes_the_simulated_table(
    fraudstream: Callable[[list[str]], Result], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "tx.csv"
    args = ["simulate", "--out", str(out), "--n-customers", "50", "--n-terminals", "100"]
    args += ["--n-days", "10", "--radius", "20", "--seed", "3", "--amount-threshold", "100"]
    result = fraudstream(args)
    assert result.exit_code == 0, result.output
    expected = simulate(
        SimulatorConfig(
            n_customers=50, n_terminals=100, n_days=10, radius=20, seed=3, amount_threshold=100
        )
    )
    pdt.assert_frame_equal(read_transactions(out), expected)
    summary = summarise(expected)
    assert f"{summary.rows:,} transactions" in result.output
    for scenario, label in ((1, "amount > threshold"), (2, "terminal"), (3, "customer")):
        count = summary.scenario_counts[scenario]
        assert re.search(rf"{label}\D+{count:,}\b", result.output), (label, count)
    assert str(out) in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/tx.json"], ".parquet or .csv"),
        (["--out", "{tmp}/tx.csv", "--n-customers", "-5"], "n_customers must be at least 1"),
    ],
)
def test_cli_refuses_bad_options_with_exit_code_2(
    fraudstream: Callable[[list[str]], Result], tmp_path: Path, args: list[str], message: str
) -> None:
    result = fraudstream(["simulate", *(arg.replace("{tmp}", str(tmp_path)) for arg in args)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# --- the published figures --------------------------------------------------------------


@pytest.mark.slow
def test_default_settings_reproduce_the_published_dataset() -> None:
    """Three seeds at the Handbook's defaults land on its published figures.

    Seed to seed, rows vary by about 0.8 %, frauds 1.4 %, scenario 1 by 5 %, 2 by 2 %, 3 by
    3 % (measured over 20 seeds). The mean of three seeds must be within 2 % (rows), 5 %
    (frauds) and 10 % (each scenario) of the published numbers, and each seed within twice
    that. The published scenario counts are increments (frauds a scenario added); ours are
    final labels, which differ by the few overridden ones (well under 1 %).
    """
    summaries = [summarise(simulate(SimulatorConfig(seed=seed))) for seed in (0, 1, 2)]

    def within(value: float, published: float, tolerance: float) -> bool:
        return abs(value / published - 1) <= tolerance

    figures = [
        ([s.rows for s in summaries], PUBLISHED_ROWS, 0.02),
        ([s.frauds for s in summaries], PUBLISHED_FRAUDS, 0.05),
        *(
            ([s.scenario_counts[k] for s in summaries], PUBLISHED_SCENARIOS[k], 0.10)
            for k in (1, 2, 3)
        ),
    ]
    for values, published, tolerance in figures:
        assert within(float(np.mean(values)), published, tolerance), (values, published)
        assert all(within(v, published, 2 * tolerance) for v in values), (values, published)
    for s in summaries:
        assert 0.0080 <= s.fraud_rate <= 0.0090
