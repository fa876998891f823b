"""The ``evaluate`` command: the Handbook's protocol over every model, or the augmentation study."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from training.commands.options import (
    AUGMENT_PANEL,
    PROTOCOL_PANEL,
    AugmentOption,
    BatchOption,
    DataOption,
    DeviceOption,
    EpochsOption,
    FraudWeightOption,
    GanStepsOption,
    HiddenOption,
    LearningRateOption,
    PatienceOption,
    RatioOption,
    SeedOption,
    SequenceLengthOption,
    ThreadsOption,
    command_line,
    fail,
    given,
    training_settings,
)
from training.commands.progress import EpochBars
from training.families import FAMILIES
from training.outputs import REPORTS

if TYPE_CHECKING:  # annotations only: the command imports these when it runs
    from rich.console import Console

    from training.dataset import FileFeatures
    from training.evaluation import FoldResult, ProtocolSettings, Split
    from training.train import AugmentConfig, TrainConfig


def evaluate_command(
    ctx: typer.Context,
    data: DataOption = Path("data/tx.parquet"),
    out: Annotated[
        Path, typer.Option(help="Report directory (JSON, Markdown, PNG).", file_okay=False)
    ] = REPORTS,
    models: Annotated[
        str,
        typer.Option(
            help="Models of the benchmark, separated by commas (default: lstm, the baselines "
            f"and the bounds): the families {', '.join(FAMILIES)}; the baselines "
            "logistic_regression, xgboost; the bounds oracle (our features) and "
            "oracle_label_delay (any model under the 7-day label delay). A suffix _28d "
            "trains on 28 days (lstm_28d).",
        ),
    ] = "",
    start: Annotated[
        str,
        typer.Option(
            help="First training day of the latest prequential fold; earlier folds start "
            "--delta-test days before each other.",
            rich_help_panel=PROTOCOL_PANEL,
        ),
    ] = "2018-08-15",
    folds: Annotated[
        int, typer.Option(help="Prequential folds.", rich_help_panel=PROTOCOL_PANEL)
    ] = 4,
    single_split_start: Annotated[
        str,
        typer.Option(
            help="First training day of the single split.", rich_help_panel=PROTOCOL_PANEL
        ),
    ] = "2018-07-25",
    delta_train: Annotated[
        int, typer.Option(help="Training days.", rich_help_panel=PROTOCOL_PANEL)
    ] = 7,
    delta_delay: Annotated[
        int, typer.Option(help="Delay days (labels not yet known).", rich_help_panel=PROTOCOL_PANEL)
    ] = 7,
    delta_test: Annotated[int, typer.Option(help="Test days.", rich_help_panel=PROTOCOL_PANEL)] = 7,
    history_days: Annotated[
        list[int] | None,
        typer.Option(
            help="Also train the LSTM and XGBoost on this many days ending with each training "
            "period (repeatable); the protocol's models train on the training period.",
            rich_help_panel=PROTOCOL_PANEL,
        ),
    ] = None,
    augment_study: Annotated[
        bool,
        typer.Option(
            help="Instead of the benchmark, compare --augment none/oversample/gan for the LSTM "
            "over --seeds on the prequential folds.",
            rich_help_panel=AUGMENT_PANEL,
        ),
    ] = False,
    seeds: Annotated[
        str, typer.Option(help="Seeds of the augmentation study.", rich_help_panel=AUGMENT_PANEL)
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
    from training.periods import evaluate_periods, file_days
    from training.transactions import read_transactions

    console = Console()
    started = time.perf_counter()
    try:
        train, augmentation = training_settings(
            sequence_length, epochs, patience, batch_size, learning_rate, fraud_weight,
            hidden_size, seed, threads, device, augment, augment_ratio, gan_steps,
        )  # fmt: skip
        try:
            seed_list = [int(part) for part in seeds.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f"--seeds must be integers separated by commas, got {seeds!r}"
            ) from None
        chosen = evaluation.check_models([m.strip() for m in models.split(",") if m.strip()])
        frame = read_transactions(data)
        fitted = evaluate_periods(
            file_days(frame), start, folds, single_split_start,
            delta_train, delta_delay, delta_test,
            given={n for n in ("start", "folds", "single_split_start") if given(ctx, n)},
        )  # fmt: skip
        if (fitted.start, fitted.folds, fitted.single_split_start) != (
            start,
            folds,
            single_split_start,
        ):
            console.print(
                f"periods fitted to the file: --start {fitted.start} --folds {fitted.folds} "
                f"--single-split-start {fitted.single_split_start}"
            )
        splits = evaluation.prequential_splits(
            fitted.start, fitted.folds, delta_train, delta_delay, delta_test
        )
        single = evaluation.Split.starting(
            fitted.single_split_start, delta_train, delta_delay, delta_test
        )
        console.print(f"computing the features of {escape(str(data))}")
        features = dataset.file_features(frame)
        info = report.data_summary(data, features)
        if augment_study:
            payload = _augment_study(
                console, features, splits, train, augmentation, seed_list, started
            )
            payload.update(command=command_line(ctx), data=info)
            paths = report.write_augment_study(out, payload)
        else:
            settings = evaluation.ProtocolSettings(
                train=train,
                augment=augmentation,
                models=_benchmark_models(chosen, history_days or []),
                valid_days=delta_train,
            )
            results = _run_folds(console, features, [*splits, single], settings)
            prequential, single_result = results[:-1], results[-1]
            payload = report.benchmark_payload(
                command=command_line(ctx),
                data=info,
                settings=settings,
                prequential=prequential,
                single=single_result,
                seconds=time.perf_counter() - started,
            )
            paths = report.write_benchmark(out, payload, prequential, single_result)
            _print_summary(console, payload)
    except FraudStreamError as exc:
        raise fail(exc) from exc
    for path in paths:
        console.print(f"written {escape(str(path))}")


def _benchmark_models(chosen: tuple[str, ...], history_days: list[int]) -> tuple[str, ...]:
    """The models ``--models`` chose (default: every kind), with the ``--history-days``
    variants of the LSTM and XGBoost; the oracle bounds last, as the report lists them."""
    from training import evaluation

    extra = [
        evaluation.model_name(kind, days)
        for days in history_days
        for kind in (evaluation.LSTM, "xgboost")
    ]
    names = [*(chosen or evaluation.MODEL_KINDS), *extra]
    oracles = evaluation.ORACLE_KNOWN_AFTER
    bounds = [n for n in names if evaluation.parse_model_name(n)[0] in oracles]
    models = [n for n in names if n not in bounds] + bounds
    return tuple(dict.fromkeys(models))  # a name given twice runs once


def _run_folds(
    console: Console,
    features: FileFeatures,
    splits: list[Split],
    settings: ProtocolSettings,
) -> list[FoldResult]:
    """Run the comparison on each split; a split seen before is not run twice."""
    from training import evaluation

    done: dict[Split, FoldResult] = {}
    with EpochBars(console, settings.train.max_epochs) as bars:
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
            with EpochBars(console, train.max_epochs) as bars:
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
