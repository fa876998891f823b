"""The ``train`` command: one protocol fold for the LSTM, thresholds, then the export."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from training.commands.export import print_card
from training.commands.options import (
    PROTOCOL_PANEL,
    AugmentOption,
    BatchOption,
    DataOption,
    DeviceOption,
    EpochsOption,
    FamilyOption,
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
from training.families import DEFAULT_FAMILY

if TYPE_CHECKING:  # annotations only: the command imports these when it runs
    from stream_app.models.card import ModelCard
    from training.train import AugmentConfig, EpochLog, TrainConfig


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
        str,
        typer.Option(
            help="Last training day (ISO date). Left out on a file that does not cover it: "
            "the file's last day less the delay and --test-days.",
            rich_help_panel=PROTOCOL_PANEL,
        ),
    ] = "2018-08-21",
    train_days: Annotated[
        int,
        typer.Option(
            help="Days of training data ending on --train-end (56: the best history measured, "
            "see training/reports/benchmark.md). Left out: fewer if the file is shorter.",
            rich_help_panel=PROTOCOL_PANEL,
        ),
    ] = 56,
    valid_days: Annotated[
        int,
        typer.Option(
            help="Validation days just before the training days: early stopping and the "
            "thresholds.",
            rich_help_panel=PROTOCOL_PANEL,
        ),
    ] = 7,
    test_days: Annotated[
        int,
        typer.Option(
            help="Test days after the 7-day delay that follows training, known-compromised "
            "cards removed as in evaluate; skipped where the file ends sooner.",
            rich_help_panel=PROTOCOL_PANEL,
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
    family: FamilyOption = DEFAULT_FAMILY.value,
    augment: AugmentOption = "none",
    augment_ratio: RatioOption = 1.0,
    gan_steps: GanStepsOption = 2000,
    labels: Annotated[
        list[Path] | None,
        typer.Option(
            "--labels",
            metavar="FILE",
            help="Label file (fraudstream labels export): its analysts' verdicts replace "
            "TX_FRAUD for the transactions it names; refused if one names another "
            "customer, terminal or time. Repeatable: the latest verdict wins.",
            dir_okay=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Train a sequence scorer (the LSTM by default) and export it to ONNX with its card."""
    from rich.console import Console

    from stream_app.errors import FraudStreamError

    console = Console()
    try:
        train, augmentation = training_settings(
            sequence_length, epochs, patience, batch_size, learning_rate, fraud_weight,
            hidden_size, seed, threads, device, augment, augment_ratio, gan_steps, family,
        )  # fmt: skip
        with EpochBars(console, train.max_epochs) as bars:
            card = _train_and_export(
                data=data,
                out=out,
                version=version,
                periods=(train_end, train_days, valid_days, test_days),
                given_periods=(given(ctx, "train_end"), given(ctx, "train_days")),
                budget=(review_cards_per_day, decline_precision),
                train=train,
                augmentation=augmentation,
                overwrite=overwrite,
                on_epoch=bars.on_epoch,
                command=command_line(ctx),
                labels=tuple(labels or ()),
                report=lambda line: console.print(line, markup=False, soft_wrap=True),
            )
    except FraudStreamError as exc:
        raise fail(exc) from exc
    print_card(console, card, out)


def _train_and_export(
    *,
    data: Path,
    out: Path,
    version: str,
    periods: tuple[str, int, int, int],
    given_periods: tuple[bool, bool],
    budget: tuple[float, float],
    train: TrainConfig,
    augmentation: AugmentConfig,
    overwrite: bool,
    on_epoch: Callable[[str, EpochLog], None],
    command: str,
    labels: Sequence[Path] = (),
    report: Callable[[str], None] = print,
) -> ModelCard:
    """Wire the pieces: one protocol fold for the chosen family alone, thresholds, export.

    The export is :func:`training.export.export_model`, which ``fraudstream export`` runs too.
    ``labels`` files override the data's TX_FRAUD first (:func:`dataset.apply_label_files`);
    ``report`` gets their one-line summary, and the card records them.
    """
    import datetime as dt
    import time

    from stream_app.errors import ConfigError
    from stream_app.models.scorer import file_sha256
    from training import dataset, evaluation, thresholds
    from training.export import export_model, parity_rows, score_histogram
    from training.periods import file_days, train_periods
    from training.sequence_model import predict
    from training.transactions import read_transactions

    started = time.perf_counter()
    train_end, train_days, valid_days, test_days = periods
    if min(train_days, valid_days, test_days) < 1:
        raise ConfigError("--train-days, --valid-days and --test-days must be at least 1")
    if out.exists() and not overwrite:  # before minutes of training, not after
        raise ConfigError(f"{out} exists: choose another --out or pass --overwrite")
    frame = read_transactions(data)
    labelled: dict[str, Any] = {}
    if labels:
        frame, merge = dataset.apply_label_files(frame, labels)
        report(merge.summary())
        files = [{"path": str(p), "sha256": file_sha256(p)} for p in labels]
        labelled = {"labels": {"files": files, **merge.to_dict()}}
    fitted = train_periods(
        file_days(frame), train_end, train_days, valid_days, test_days,
        given_end=given_periods[0], given_days=given_periods[1],
    )  # fmt: skip
    train_end, train_days = fitted.train_end, fitted.train_days
    try:
        last = dt.date.fromisoformat(train_end)
    except ValueError:
        raise ConfigError(f"--train-end must be an ISO date, got {train_end!r}") from None
    first = last - dt.timedelta(days=evaluation.DELTA_DAYS - 1)
    delta = evaluation.DELTA_DAYS
    split = evaluation.Split.starting(first, delta, delta, test_days)
    name = evaluation.model_name(train.model.family, train_days)
    settings = evaluation.ProtocolSettings(
        train=train, augment=augmentation, models=(name,), valid_days=valid_days
    )
    features = dataset.file_features(frame)
    fold = evaluation.run_fold(features, split, settings, on_epoch)
    run = fold.runs[name]
    assert run.fit is not None and run.valid is not None  # a family's run carries both
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
    rows = parity_rows(features, split)
    return export_model(
        model,
        out,
        version=version or f"{train.model.family}-{augmentation.mode}-{train_end}",
        parity_sequences=features.offline.sequences(train.sequence_length, rows),
        thresholds=choice.thresholds,
        reference=score_histogram(valid_scores, f"validation period {valid_period}"),
        training={
            "data_file": str(data),
            "data_sha256": file_sha256(data),
            # The protocol's layout: `fraudstream export` finds the parity rows again in it.
            "split": split.describe(),
            "train_days": run.details["train_days"],
            "validation_days": valid_period,
            "train_transactions": run.details["train_transactions"],
            "train_frauds": run.details["train_frauds"],
            "config": train.to_dict(),
            "fit": {k: v for k, v in run.fit.describe().items() if k != "gan_fidelity"},
            "seconds": round(time.perf_counter() - started, 1),
            "command": command,
            **labelled,
        },
        metrics=metrics,
        gan_fidelity=run.fit.fidelity.to_dict() if run.fit.fidelity else None,
        overwrite=overwrite,
    )
