"""Offline commands of the ``fraudstream`` CLI: simulate, train, evaluate, export, score-file.

Only typer is imported at module level; each command imports what it needs when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # annotations only: the commands import these when they run
    from types import TracebackType

    from rich.console import Console
    from rich.progress import Progress, TaskID

    from stream_app.model_card import ModelCard
    from training.dataset import FileFeatures
    from training.evaluation import FoldResult, ProtocolSettings, Split
    from training.train import AugmentConfig, EpochLog, TrainConfig

# The simulator's defaults are repeated in the option declarations so that `--help` shows
# them without importing numpy and pandas; tests/test_simulator.py checks they stay equal to
# SimulatorConfig's.
_FRAUD = "Fraud scenarios"


def simulate_command(
    out: Annotated[
        Path,
        typer.Option(
            help="Output file; the extension picks the format: .parquet or .csv.",
            dir_okay=False,
        ),
    ],
    n_customers: Annotated[int, typer.Option(help="Number of customers.")] = 5000,
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


# --- train, evaluate, score-file -------------------------------------------------------
# As for simulate, defaults are literals so that `--help` imports nothing heavy;
# tests/test_training_commands.py checks them against TrainConfig, GanConfig and the rest.
_MODEL = "Model and training"
_AUGMENT = "Augmentation"
_PROTOCOL = "Periods"

DataOption = Annotated[
    Path, typer.Option(help="Transactions file (.parquet or .csv).", dir_okay=False)
]
SequenceLengthOption = Annotated[
    int, typer.Option(help="Transactions per sequence (T).", rich_help_panel=_MODEL)
]
EpochsOption = Annotated[
    int, typer.Option(help="Most epochs; early stopping may end sooner.", rich_help_panel=_MODEL)
]
PatienceOption = Annotated[
    int,
    typer.Option(
        help="Epochs without a better validation AP before stopping.", rich_help_panel=_MODEL
    ),
]
BatchOption = Annotated[int, typer.Option(help="Batch size.", rich_help_panel=_MODEL)]
LearningRateOption = Annotated[
    float, typer.Option(help="AdamW learning rate.", rich_help_panel=_MODEL)
]
FraudWeightOption = Annotated[
    float,
    typer.Option(
        help="Loss weight of a fraud relative to a genuine transaction (class imbalance).",
        rich_help_panel=_MODEL,
    ),
]
HiddenOption = Annotated[int, typer.Option(help="LSTM hidden size.", rich_help_panel=_MODEL)]
SeedOption = Annotated[
    int, typer.Option(help="Random seed (torch, numpy, the GAN).", rich_help_panel=_MODEL)
]
ThreadsOption = Annotated[
    int, typer.Option(help="CPU threads for torch and XGBoost.", rich_help_panel=_MODEL)
]
DeviceOption = Annotated[
    str, typer.Option(help="auto (CUDA when present), cpu or cuda.", rich_help_panel=_MODEL)
]
AugmentOption = Annotated[
    str,
    typer.Option(
        help="Extra fraud sequences for training: none, oversample (real ones repeated) or "
        "gan (synthetic ones from a WGAN-GP trained on the training frauds).",
        rich_help_panel=_AUGMENT,
    ),
]
RatioOption = Annotated[
    float, typer.Option(help="Extra fraud sequences per real fraud.", rich_help_panel=_AUGMENT)
]
GanStepsOption = Annotated[int, typer.Option(help="GAN generator steps.", rich_help_panel=_AUGMENT)]


def _settings(
    sequence_length: int,
    epochs: int,
    patience: int,
    batch_size: int,
    learning_rate: float,
    fraud_weight: float,
    hidden_size: int,
    seed: int,
    threads: int,
    device: str,
    augment: str,
    augment_ratio: float,
    gan_steps: int,
) -> tuple[TrainConfig, AugmentConfig]:
    """The training and augmentation settings the shared options describe."""
    from dataclasses import replace

    from stream_app.errors import ConfigError
    from training.gan import GanConfig
    from training.sequence_model import ModelConfig
    from training.train import Augment, AugmentConfig, TrainConfig

    try:
        mode = Augment(augment)
    except ValueError:
        choices = ", ".join(a.value for a in Augment)
        raise ConfigError(f"--augment must be one of {choices}, got {augment!r}") from None
    if augment_ratio < 0:
        raise ConfigError(f"--augment-ratio must not be negative, got {augment_ratio}")
    train = TrainConfig(
        sequence_length=sequence_length,
        max_epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        learning_rate=learning_rate,
        fraud_weight=fraud_weight,
        seed=seed,
        threads=threads,
        device=device,
        model=replace(ModelConfig(), hidden_size=hidden_size),
    )
    gan = replace(GanConfig(), generator_steps=gan_steps, threads=threads)
    return train, AugmentConfig(mode=mode, ratio=augment_ratio, gan=gan)


def _fail(exc: Exception) -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(code=2)


def _command_line(ctx: typer.Context) -> str:
    """The command being run, with the options that differ from their defaults."""
    parts = ["fraudstream", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        explicit = param.name in ("data", "out")  # always shown: what the command read and wrote
        if not explicit and (value == param.default or value in (None, [], ())):
            continue
        flag = param.opts[0]
        if isinstance(value, bool):
            parts.append(flag)
        else:
            for item in value if isinstance(value, list | tuple) else [value]:
                parts += [flag, str(item)]
    return " ".join(parts)


def train_command(
    ctx: typer.Context,
    data: DataOption = Path("data/tx.parquet"),
    out: Annotated[
        Path, typer.Option(help="Model directory to write (model.onnx and model_card.json).")
    ] = Path("onnx_models/default"),
    version: Annotated[
        str, typer.Option(help="Model version; default lstm-<augment>-<last training day>.")
    ] = "",
    train_end: Annotated[
        str, typer.Option(help="Last training day (ISO date).", rich_help_panel=_PROTOCOL)
    ] = "2018-08-21",
    train_days: Annotated[
        int,
        typer.Option(
            help="Days of training data ending on --train-end (56: the best history measured, "
            "see training/reports/benchmark.md).",
            rich_help_panel=_PROTOCOL,
        ),
    ] = 56,
    valid_days: Annotated[
        int,
        typer.Option(
            help="Validation days just before the training days: early stopping and the "
            "thresholds.",
            rich_help_panel=_PROTOCOL,
        ),
    ] = 7,
    test_days: Annotated[
        int,
        typer.Option(
            help="Test days after the 7-day delay that follows training, known-compromised "
            "cards removed as in evaluate; skipped where the file ends sooner.",
            rich_help_panel=_PROTOCOL,
        ),
    ] = 7,
    review_cards_per_day: Annotated[
        float, typer.Option(help="Alert budget: cards a day reaching the review threshold.")
    ] = 100.0,
    decline_precision: Annotated[
        float, typer.Option(help="Precision the decline threshold reaches on validation.")
    ] = 0.9,
    sequence_length: SequenceLengthOption = 5,
    epochs: EpochsOption = 12,
    patience: PatienceOption = 3,
    batch_size: BatchOption = 256,
    learning_rate: LearningRateOption = 3e-3,
    fraud_weight: FraudWeightOption = 5.0,
    hidden_size: HiddenOption = 64,
    seed: SeedOption = 0,
    threads: ThreadsOption = 2,
    device: DeviceOption = "auto",
    augment: AugmentOption = "none",
    augment_ratio: RatioOption = 1.0,
    gan_steps: GanStepsOption = 2000,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Train the LSTM sequence scorer and export it to ONNX with its model card."""
    from rich.console import Console

    from stream_app.errors import FraudStreamError

    console = Console()
    try:
        train, augmentation = _settings(
            sequence_length, epochs, patience, batch_size, learning_rate, fraud_weight,
            hidden_size, seed, threads, device, augment, augment_ratio, gan_steps,
        )  # fmt: skip
        with _EpochBars(console, train.max_epochs) as bars:
            card = _train_and_export(
                data=data,
                out=out,
                version=version,
                periods=(train_end, train_days, valid_days, test_days),
                budget=(review_cards_per_day, decline_precision),
                train=train,
                augmentation=augmentation,
                overwrite=overwrite,
                on_epoch=bars.on_epoch,
                command=_command_line(ctx),
            )
    except FraudStreamError as exc:
        raise _fail(exc) from exc
    _print_card(console, card, out)


def _train_and_export(
    *,
    data: Path,
    out: Path,
    version: str,
    periods: tuple[str, int, int, int],
    budget: tuple[float, float],
    train: TrainConfig,
    augmentation: AugmentConfig,
    overwrite: bool,
    on_epoch: Callable[[str, EpochLog], None],
    command: str,
) -> ModelCard:
    """Wire the pieces: one protocol fold for the LSTM alone, thresholds, export."""
    import datetime as dt
    import time

    import torch

    from stream_app.errors import ConfigError
    from stream_app.scoring import file_sha256
    from training import dataset, evaluation, thresholds
    from training.export import export_model
    from training.sequence_model import predict
    from training.transactions import read_transactions

    started = time.perf_counter()
    train_end, train_days, valid_days, test_days = periods
    if min(train_days, valid_days, test_days) < 1:
        raise ConfigError("--train-days, --valid-days and --test-days must be at least 1")
    if out.exists() and not overwrite:  # before minutes of training, not after
        raise ConfigError(f"{out} exists: choose another --out or pass --overwrite")
    try:
        last = dt.date.fromisoformat(train_end)
    except ValueError:
        raise ConfigError(f"--train-end must be an ISO date, got {train_end!r}") from None
    first = last - dt.timedelta(days=evaluation.DELTA_DAYS - 1)
    delta = evaluation.DELTA_DAYS
    split = evaluation.Split.starting(first, delta, delta, test_days)
    name = evaluation.model_name(evaluation.LSTM, train_days)
    settings = evaluation.ProtocolSettings(
        train=train, augment=augmentation, models=(name,), valid_days=valid_days
    )
    features = dataset.file_features(read_transactions(data))
    fold = evaluation.run_fold(features, split, settings, on_epoch)
    run = fold.runs[name]
    assert run.fit is not None and run.valid is not None  # an LSTM run carries both
    valid = run.valid
    model = run.fit.trained.model
    valid_scores = predict(model, valid.sequences)
    valid_period = run.details["validation_days"]
    choice = thresholds.choose_thresholds(
        valid.days, valid.customers, valid.labels, valid_scores, valid_period, *budget
    )
    metrics: dict[str, Any] = {
        "validation": evaluation.assess(valid.days, valid.customers, valid.labels, valid_scores),
        "validation_note": "also the early-stopping set: optimistic",
    }
    if run.metrics:
        metrics["test"] = run.metrics
        metrics["test_period"] = split.test.label
        metrics["test_note"] = "known-compromised cards removed, as in fraudstream evaluate"
    parity_rows = evaluation.assessment_rows(features, split)
    if len(parity_rows) < 1000:
        parity_rows = features.rows(dataset.Period(features.last_day - 6, features.last_day))
    card = export_model(
        model,
        out,
        version=version or f"lstm-{augmentation.mode}-{train_end}",
        parity_sequences=features.offline.sequences(train.sequence_length, parity_rows[:4096]),
        thresholds=choice.thresholds,
        reference_scores=valid_scores,
        reference_source=f"validation period {valid_period}",
        training={
            "data_file": str(data),
            "data_sha256": file_sha256(data),
            "train_days": run.details["train_days"],
            "validation_days": valid_period,
            "train_transactions": run.details["train_transactions"],
            "train_frauds": run.details["train_frauds"],
            "config": train.to_dict(),
            "fit": {k: v for k, v in run.fit.describe().items() if k != "gan_fidelity"},
            "seconds": round(time.perf_counter() - started, 1),
            "command": command,
        },
        metrics=metrics,
        gan_fidelity=run.fit.fidelity.to_dict() if run.fit.fidelity else None,
        overwrite=overwrite,
    )
    # The PyTorch weights too (a few hundred kB), so the model contract test can rebuild the
    # model and compare it with the ONNX graph on fresh inputs.
    torch.save(model.state_dict(), out / "model.pt")
    return card


def evaluate_command(
    ctx: typer.Context,
    data: DataOption = Path("data/tx.parquet"),
    out: Annotated[
        Path, typer.Option(help="Report directory (JSON, Markdown, PNG).", file_okay=False)
    ] = Path("training/reports"),
    start: Annotated[
        str,
        typer.Option(
            help="First training day of the latest prequential fold; earlier folds start "
            "--delta-test days before each other.",
            rich_help_panel=_PROTOCOL,
        ),
    ] = "2018-08-15",
    folds: Annotated[int, typer.Option(help="Prequential folds.", rich_help_panel=_PROTOCOL)] = 4,
    single_split_start: Annotated[
        str, typer.Option(help="First training day of the single split.", rich_help_panel=_PROTOCOL)
    ] = "2018-07-25",
    delta_train: Annotated[int, typer.Option(help="Training days.", rich_help_panel=_PROTOCOL)] = 7,
    delta_delay: Annotated[
        int, typer.Option(help="Delay days (labels not yet known).", rich_help_panel=_PROTOCOL)
    ] = 7,
    delta_test: Annotated[int, typer.Option(help="Test days.", rich_help_panel=_PROTOCOL)] = 7,
    history_days: Annotated[
        list[int] | None,
        typer.Option(
            help="Also train the LSTM and XGBoost on this many days ending with each training "
            "period (repeatable); the protocol's models train on the training period.",
            rich_help_panel=_PROTOCOL,
        ),
    ] = None,
    augment_study: Annotated[
        bool,
        typer.Option(
            help="Instead of the benchmark, compare --augment none/oversample/gan for the LSTM "
            "over --seeds on the prequential folds.",
            rich_help_panel=_AUGMENT,
        ),
    ] = False,
    seeds: Annotated[
        str, typer.Option(help="Seeds of the augmentation study.", rich_help_panel=_AUGMENT)
    ] = "0,1,2",
    sequence_length: SequenceLengthOption = 5,
    epochs: EpochsOption = 12,
    patience: PatienceOption = 3,
    batch_size: BatchOption = 256,
    learning_rate: LearningRateOption = 3e-3,
    fraud_weight: FraudWeightOption = 5.0,
    hidden_size: HiddenOption = 64,
    seed: SeedOption = 0,
    threads: ThreadsOption = 2,
    device: DeviceOption = "auto",
    augment: AugmentOption = "none",
    augment_ratio: RatioOption = 1.0,
    gan_steps: GanStepsOption = 2000,
) -> None:
    """Assess the LSTM against logistic regression and XGBoost with the Handbook's protocol."""
    import time

    from rich.console import Console
    from rich.markup import escape

    from stream_app.errors import ConfigError, FraudStreamError
    from training import dataset, evaluation, report
    from training.baselines import BASELINE_NAMES
    from training.transactions import read_transactions

    console = Console()
    started = time.perf_counter()
    try:
        train, augmentation = _settings(
            sequence_length, epochs, patience, batch_size, learning_rate, fraud_weight,
            hidden_size, seed, threads, device, augment, augment_ratio, gan_steps,
        )  # fmt: skip
        splits = evaluation.prequential_splits(start, folds, delta_train, delta_delay, delta_test)
        single = evaluation.Split.starting(single_split_start, delta_train, delta_delay, delta_test)
        try:
            seed_list = [int(part) for part in seeds.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f"--seeds must be integers separated by commas, got {seeds!r}"
            ) from None
        console.print(f"computing the features of {escape(str(data))}")
        features = dataset.file_features(read_transactions(data))
        info = report.data_summary(data, features)
        if augment_study:
            payload = _augment_study(
                console, features, splits, train, augmentation, seed_list, started
            )
            payload.update(command=_command_line(ctx), data=info)
            paths = report.write_augment_study(out, payload)
        else:
            extra = [
                evaluation.model_name(kind, days)
                for days in history_days or []
                for kind in (evaluation.LSTM, "xgboost")
            ]
            models = (evaluation.LSTM, *BASELINE_NAMES, *extra, evaluation.ORACLE)
            settings = evaluation.ProtocolSettings(
                train=train, augment=augmentation, models=models, valid_days=delta_train
            )
            results = _run_folds(console, features, [*splits, single], settings)
            prequential, single_result = results[:-1], results[-1]
            payload = report.benchmark_payload(
                command=_command_line(ctx),
                data=info,
                settings=settings,
                prequential=prequential,
                single=single_result,
                seconds=time.perf_counter() - started,
            )
            paths = report.write_benchmark(out, payload, prequential, single_result)
            _print_summary(console, payload)
    except FraudStreamError as exc:
        raise _fail(exc) from exc
    for path in paths:
        console.print(f"written {escape(str(path))}")


def _run_folds(
    console: Console,
    features: FileFeatures,
    splits: list[Split],
    settings: ProtocolSettings,
) -> list[FoldResult]:
    """Run the comparison on each split; a split seen before is not run twice."""
    from training import evaluation

    done: dict[Split, FoldResult] = {}
    with _EpochBars(console, settings.train.max_epochs) as bars:
        for i, split in enumerate(splits, 1):
            if split not in done:
                bars.prefix = f"test {split.test.label} "
                done[split] = evaluation.run_fold(features, split, settings, bars.on_epoch)
                metrics = done[split].runs
                text = ", ".join(
                    f"{name} AP {run.metrics.get('average_precision', float('nan')):.3f}"
                    for name, run in metrics.items()
                )
                bars.progress.console.print(f"split {i}/{len(splits)} {split.test.label}: {text}")
    return [done[split] for split in splits]


def _augment_study(
    console: Console,
    features: FileFeatures,
    splits: list[Split],
    train: TrainConfig,
    augmentation: AugmentConfig,
    seeds: list[int],
    started: float,
) -> dict[str, Any]:
    """The LSTM with each augmentation mode and seed on the prequential folds."""
    import time
    from dataclasses import replace

    from training import evaluation, report
    from training.train import Augment

    runs: dict[str, dict[int, list[FoldResult]]] = {}
    seconds: dict[str, float] = {}
    for mode in Augment:
        mode_started = time.perf_counter()
        for seed in seeds:
            settings = evaluation.ProtocolSettings(
                train=replace(train, seed=seed),
                augment=replace(augmentation, mode=mode),
                models=(evaluation.LSTM,),
            )
            with _EpochBars(console, train.max_epochs) as bars:
                bars.prefix = f"{mode} seed {seed} "
                runs.setdefault(str(mode), {})[seed] = [
                    evaluation.run_fold(features, split, settings, bars.on_epoch)
                    for split in splits
                ]
        seconds[str(mode)] = time.perf_counter() - mode_started
    return report.augment_payload(runs, seconds, augmentation.ratio, time.perf_counter() - started)


def _print_summary(console: Console, payload: dict[str, Any]) -> None:
    from rich.table import Table

    from training import report

    table = Table(title="Prequential, mean ± std over folds")
    table.add_column("Model")
    for title in report.METRIC_TITLES.values():
        table.add_column(title, justify="right")
    for model, metrics in payload["prequential"]["summary"].items():
        cells = [
            f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" for m in report.METRIC_TITLES
        ]
        table.add_row(report.DISPLAY_NAMES.get(model, model), *cells)
    console.print(table)


def score_file_command(
    data: Annotated[Path, typer.Option(help="Transactions file to score.", dir_okay=False)],
    model: Annotated[
        Path,
        typer.Option(help="Model directory (model.onnx and model_card.json).", file_okay=False),
    ],
    out: Annotated[
        Path, typer.Option(help="Scores file to write; .parquet or .csv.", dir_okay=False)
    ],
) -> None:
    """Score every transaction of a file offline, as the worker would, and write the scores."""
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from stream_app.errors import FraudStreamError
    from training.score_file import score_file

    console = Console()
    started = time.perf_counter()
    try:
        scored = score_file(data, model, out)
    except FraudStreamError as exc:
        raise _fail(exc) from exc
    seconds = time.perf_counter() - started
    table = Table(title=f"{len(scored.table):,} transactions scored by {scored.model_version}")
    table.add_column("Decision")
    table.add_column("Transactions", justify="right")
    table.add_column("Share", justify="right")
    counts = scored.table["decision"].value_counts()
    for decision, count in counts.items():
        table.add_row(str(decision), f"{count:,}", f"{count / max(len(scored.table), 1):.2%}")
    console.print(table)
    rate = len(scored.table) / seconds if seconds > 0 else float("inf")
    console.print(f"{seconds:.1f} s ({rate:,.0f} transactions/s); written to {escape(str(out))}")


class _EpochBars:
    """One rich progress bar per LSTM fit, advanced each epoch with its validation AP."""

    def __init__(self, console: Console, total: int, prefix: str = "") -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.total = total
        self.prefix = prefix
        self.progress: Progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            TextColumn("epoch {task.completed}/{task.total}"),
            TextColumn("{task.fields[metric]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks: dict[str, TaskID] = {}
        self.current: TaskID | None = None
        self.best = 0.0

    def __enter__(self) -> _EpochBars:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._finish()
        self.progress.stop()

    def _finish(self) -> None:
        # Fits run one after another: a new bar means the previous fit stopped (early
        # stopping ends before the last epoch), so freeze its clock.
        if self.current is not None:
            self.progress.stop_task(self.current)

    def on_epoch(self, name: str, log: EpochLog) -> None:
        """Advance the bar of ``name`` (with :attr:`prefix`), creating it on its first epoch."""
        label = f"{self.prefix}{name}"
        if label not in self.tasks or log.epoch == 1:
            self._finish()
            self.tasks[label] = self.current = self.progress.add_task(
                label, total=self.total, metric=""
            )
            self.best = 0.0
        self.best = max(self.best, log.valid_average_precision)
        self.progress.update(
            self.tasks[label],
            completed=log.epoch,
            metric=f"valid AP {log.valid_average_precision:.4f} (best {self.best:.4f})",
        )


def _print_card(console: Console, card: ModelCard, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"model {card.version}")
    table.add_column("")
    table.add_column("")
    for period, metrics in card.metrics.items():
        if isinstance(metrics, dict):
            text = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            table.add_row(f"{period} metrics", text)
    table.add_row("review threshold", f"{card.thresholds.review:.6g}")
    table.add_row("decline threshold", f"{card.thresholds.decline:.6g}")
    training = card.training
    table.add_row("training", f"{training.get('seconds')} s on {training.get('train_days')}")
    fidelity = card.gan_fidelity
    if fidelity:
        text = f"C2ST AUC {fidelity['c2st_auc']:.3f}, KS mean {fidelity['ks_mean']:.3f}"
        table.add_row("GAN fidelity", text)
    console.print(table)
    console.print(f"written to {escape(str(out))}")


def register(app: typer.Typer) -> None:
    """Add the offline commands to the ``fraudstream`` application."""
    app.command("simulate")(simulate_command)
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("score-file")(score_file_command)
