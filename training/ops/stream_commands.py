"""The ``replay`` and ``demo`` commands of the ``fraudstream`` CLI.

``stream_app.cli.COMMANDS`` registers them. Only typer is imported here; each command
imports what it needs when it runs.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

_KAFKA = "Kafka (default: the FRAUDSTREAM_* settings)"


class BrokerChoice(enum.StrEnum):
    """The local brokers a command can start (see :mod:`training.ops.services.brokers`)."""

    BUNDLED = "bundled"
    KAFKA = "kafka"


def _fail(message: str) -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=2)


def replay_command(
    data: Annotated[
        Path,
        typer.Option(
            help="Transactions file (.parquet or .csv), as `fraudstream simulate` writes it.",
            dir_okay=False,
        ),
    ],
    rate: Annotated[
        float, typer.Option(help="Transactions per second; 0 publishes as fast as possible.")
    ] = 1000.0,
    labels_delay: Annotated[
        str | None,
        typer.Option(
            help="Also publish each fraud's label this long after it (e.g. 7d, 12h), "
            "interleaved in event-time order. Without it no label is published."
        ),
    ] = None,
    all_labels: Annotated[
        bool, typer.Option(help="Label genuine transactions too (frauds only by default).")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(help="Publish only the first N transactions.", min=1)
    ] = None,
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers.", rich_help_panel=_KAFKA)
    ] = None,
    transactions_topic: Annotated[
        str | None, typer.Option(help="Transactions topic.", rich_help_panel=_KAFKA)
    ] = None,
    labels_topic: Annotated[
        str | None, typer.Option(help="Labels topic.", rich_help_panel=_KAFKA)
    ] = None,
) -> None:
    """Publish a transactions file to Kafka in event-time order, keyed by customer id."""
    import asyncio

    from aiokafka.errors import KafkaConnectionError
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from stream_app.backoff import describe_error
    from stream_app.config import load_settings
    from stream_app.errors import FraudStreamError
    from training.ops.replay import ReplayStats, parse_duration, replay, replay_messages
    from training.transactions import read_transactions

    console = Console()
    try:
        overrides: dict[str, object] = {}
        if bootstrap is not None:
            overrides["kafka_bootstrap_servers"] = bootstrap
        if transactions_topic is not None:
            overrides["topic_transactions"] = transactions_topic
        if labels_topic is not None:
            overrides["topic_labels"] = labels_topic
        settings = load_settings(**overrides)
        delay = parse_duration(labels_delay) if labels_delay is not None else None
        frame = read_transactions(data)
        total = len(frame) if limit is None else min(limit, len(frame))
        messages = replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            labels_delay=delay,
            all_labels=all_labels,
            limit=limit,
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8,.0f}/s  {task.fields[labels]:,} labels"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("replaying", total=total, rate=0.0, labels=0)

            def progress(stats: ReplayStats) -> None:
                bar.update(task, completed=stats.transactions, rate=stats.rate, labels=stats.labels)

            stats = asyncio.run(replay(messages, settings, rate=rate, on_progress=progress))
    except FraudStreamError as exc:
        raise _fail(str(exc)) from exc
    except (OSError, KafkaConnectionError) as exc:  # no broker there (a one-shot: no retry)
        raise _fail(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} ({describe_error(exc)}): "
            "start a broker there, or pass --bootstrap (or FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS) "
            "with the address of yours"
        ) from exc
    console.print(
        f"published {stats.transactions:,} transactions and {stats.labels:,} labels to "
        f"{settings.topic_transactions} in {stats.seconds:.1f} s ({stats.rate:,.0f}/s)"
    )


def demo_command(
    events: Annotated[
        int | None, typer.Option(help="Replay only the first N transactions.", min=1)
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop replaying after S seconds.", min=1)
    ] = None,
    rate: Annotated[
        float,
        typer.Option(help="Transactions per second replayed; 0 for as fast as possible.", min=0),
    ] = 400,
    model_dir: Annotated[
        Path | None,
        typer.Option(help="Model directory (default FRAUDSTREAM_MODEL_DIR, onnx_models/default)."),
    ] = None,
    n_customers: Annotated[
        int,
        typer.Option(
            help="About this many customers: a region of the Handbook's population, its "
            "density and fraud rate.",
            min=10,
        ),
    ] = 300,
    n_days: Annotated[int, typer.Option(help="Simulated days.", min=10)] = 30,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 42,
    # The names before `simulate`'s were adopted; kept, hidden, for old scripts.
    customers: Annotated[int | None, typer.Option(hidden=True, min=10)] = None,
    days: Annotated[int | None, typer.Option(hidden=True, min=10)] = None,
    keep_running: Annotated[
        bool,
        typer.Option(
            help="Keep the worker, its metrics and the review console up after the summary "
            "(until Ctrl-C)."
        ),
    ] = False,
    broker: Annotated[
        BrokerChoice,
        typer.Option(
            help="Local broker: bundled (no JVM, starts in a second) or kafka (Apache Kafka "
            "from Maven Central, exactly-once as deployed; needs Java and Maven)."
        ),
    ] = BrokerChoice.BUNDLED,
) -> None:
    """Run broker, Redis, worker and a replay locally; show live scores and a summary.

    With the console extra installed it also runs the analyst review console and prints its
    address and a demo login. With no configuration everything is local and throw-away.
    Set KAFKA_BOOTSTRAP_SERVERS and/or REDIS_URL (or their FRAUDSTREAM_ names) to use
    existing services instead.
    """
    from stream_app.errors import FraudStreamError
    from training.ops.demo import DemoOptions, run_demo

    options = DemoOptions(
        events=events,
        duration_s=duration,
        rate=rate,
        model_dir=model_dir,
        seed=seed,
        n_customers=customers if customers is not None else n_customers,
        n_days=days if days is not None else n_days,
        keep_running=keep_running,
        broker=broker.value,
    )
    try:
        run_demo(options)
    except FraudStreamError as exc:
        raise _fail(str(exc)) from exc
    except KeyboardInterrupt:
        # Everything was stopped on the way out (run_demo's context managers); the shell
        # convention for "ended by Ctrl-C" is 128 + SIGINT.
        raise typer.Exit(code=130) from None
