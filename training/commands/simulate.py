"""The ``simulate`` command: labelled transactions from the Fraud Detection Handbook simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

import typer

# The simulator's defaults are repeated in the option declarations so that `--help` shows
# them without importing numpy and pandas; tests/training/test_simulator.py checks they stay
# equal to SimulatorConfig's.
_FRAUD = "Fraud scenarios"

DEFAULT_CUSTOMERS: Final = 5000  # the Handbook's population


def simulate_command(
    out: Annotated[
        Path,
        typer.Option(
            help="Output file; the extension picks the format: .parquet or .csv.",
            dir_okay=False,
        ),
    ],
    n_customers: Annotated[int, typer.Option(help="Number of customers.")] = DEFAULT_CUSTOMERS,
    n_terminals: Annotated[int, typer.Option(help="Number of terminals.")] = 10000,
    n_days: Annotated[int, typer.Option(help="Number of simulated days.")] = 183,
    start_date: Annotated[str, typer.Option(help="First day, ISO date (UTC).")] = "2018-04-01",
    radius: Annotated[
        float, typer.Option(help="A customer uses the terminals closer than this.")
    ] = 5.0,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same data.")] = 1,
    amount_threshold: Annotated[
        float,
        typer.Option(help="Scenario 1: every amount above this is fraud.", rich_help_panel=_FRAUD),
    ] = 220.0,
    compromised_terminals_per_day: Annotated[
        int,
        typer.Option(help="Scenario 2: terminals compromised each day.", rich_help_panel=_FRAUD),
    ] = 2,
    terminal_compromise_days: Annotated[
        int,
        typer.Option(help="Scenario 2: days a terminal stays compromised.", rich_help_panel=_FRAUD),
    ] = 28,
    compromised_customers_per_day: Annotated[
        int,
        typer.Option(help="Scenario 3: customers compromised each day.", rich_help_panel=_FRAUD),
    ] = 3,
    customer_compromise_days: Annotated[
        int,
        typer.Option(help="Scenario 3: days a customer stays compromised.", rich_help_panel=_FRAUD),
    ] = 14,
    customer_fraud_fraction: Annotated[
        float,
        typer.Option(
            help="Scenario 3: share of a compromised customer's transactions made fraudulent.",
            rich_help_panel=_FRAUD,
        ),
    ] = 1 / 3,
    customer_fraud_amount_factor: Annotated[
        float,
        typer.Option(
            help="Scenario 3: the fraudulent amounts are multiplied by this.",
            rich_help_panel=_FRAUD,
        ),
    ] = 5.0,
) -> None:
    """Simulate labelled card transactions (the Fraud Detection Handbook simulator)."""
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from stream_app.errors import FraudStreamError
    from training import simulator, transactions

    console = Console()
    started = time.perf_counter()
    try:
        config = simulator.SimulatorConfig(
            n_customers=n_customers,
            n_terminals=n_terminals,
            n_days=n_days,
            start_date=start_date,
            radius=radius,
            seed=seed,
            amount_threshold=amount_threshold,
            compromised_terminals_per_day=compromised_terminals_per_day,
            terminal_compromise_days=terminal_compromise_days,
            compromised_customers_per_day=compromised_customers_per_day,
            customer_compromise_days=customer_compromise_days,
            customer_fraud_fraction=customer_fraud_fraction,
            customer_fraud_amount_factor=customer_fraud_amount_factor,
        )
        transactions.output_format(out)  # checked before simulating: a typo costs no waiting
        stages = [*simulator.STAGES, "writing"]
        with Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(stages[0], total=len(stages))

            def advance(stage: str) -> None:
                bar.update(task, description=stage, completed=stages.index(stage))

            frame = simulator.simulate(config, advance)
            advance("writing")
            transactions.write_transactions(frame, out)
            bar.update(task, description="done", completed=len(stages))
    except FraudStreamError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from exc

    summary = simulator.summarise(frame)
    table = Table(title="Frauds by scenario")
    table.add_column("Scenario")
    table.add_column("Transactions", justify="right")
    table.add_column("Share of frauds", justify="right")
    names = {1: "1 amount > threshold", 2: "2 compromised terminal", 3: "3 compromised customer"}
    for scenario, count in summary.scenario_counts.items():
        share = count / summary.frauds if summary.frauds else 0.0
        table.add_row(names[scenario], f"{count:,}", f"{share:.1%}")
    console.print(table)
    console.print(
        f"{summary.rows:,} transactions, {summary.frauds:,} frauds "
        f"({summary.fraud_rate:.2%}) in {time.perf_counter() - started:.1f} s"
    )
    console.print(f"written to {escape(str(out))}")
    if n_customers < DEFAULT_CUSTOMERS:
        console.print(
            f"note: the fraud scenarios compromise {compromised_terminals_per_day} terminals "
            f"and {compromised_customers_per_day} customers a day whatever the population, "
            f"so fewer customers than the default {DEFAULT_CUSTOMERS:,} means a larger share "
            "of frauds; scale --compromised-terminals-per-day and "
            "--compromised-customers-per-day with the population to keep the default's rate",
            markup=False,
            highlight=False,
        )
