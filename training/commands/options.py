"""What the offline commands share: option declarations, settings, errors, the command line.

Defaults are literals so that ``--help`` imports nothing heavy;
tests/training/test_commands.py checks them against TrainConfig, GanConfig and the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from training.families import DEFAULT_FAMILY, FAMILIES

if TYPE_CHECKING:  # annotations only: the commands import these when they run
    from training.train import AugmentConfig, TrainConfig

# Help panels grouping the options of train and evaluate.
MODEL_PANEL = "Model and training"
AUGMENT_PANEL = "Augmentation"
PROTOCOL_PANEL = "Periods"

DataOption = Annotated[
    Path, typer.Option(help="Transactions file (.parquet or .csv).", dir_okay=False)
]
SequenceLengthOption = Annotated[
    int, typer.Option(help="Transactions per sequence (T).", rich_help_panel=MODEL_PANEL)
]
EpochsOption = Annotated[
    int,
    typer.Option(help="Most epochs; early stopping may end sooner.", rich_help_panel=MODEL_PANEL),
]
PatienceOption = Annotated[
    int,
    typer.Option(
        help="Epochs without a better validation AP before stopping.", rich_help_panel=MODEL_PANEL
    ),
]
BatchOption = Annotated[int, typer.Option(help="Batch size.", rich_help_panel=MODEL_PANEL)]
LearningRateOption = Annotated[
    float, typer.Option(help="AdamW learning rate.", rich_help_panel=MODEL_PANEL)
]
FraudWeightOption = Annotated[
    float,
    typer.Option(
        help="Loss weight of a fraud relative to a genuine transaction (class imbalance).",
        rich_help_panel=MODEL_PANEL,
    ),
]
HiddenOption = Annotated[int, typer.Option(help="LSTM hidden size.", rich_help_panel=MODEL_PANEL)]
SeedOption = Annotated[
    int, typer.Option(help="Random seed (torch, numpy, the GAN).", rich_help_panel=MODEL_PANEL)
]
ThreadsOption = Annotated[
    int, typer.Option(help="CPU threads for torch and XGBoost.", rich_help_panel=MODEL_PANEL)
]
DeviceOption = Annotated[
    str, typer.Option(help="auto (CUDA when present), cpu or cuda.", rich_help_panel=MODEL_PANEL)
]
AugmentOption = Annotated[
    str,
    typer.Option(
        help="Extra fraud sequences for training: none, oversample (real ones repeated) or "
        "gan (synthetic ones from a WGAN-GP trained on the training frauds).",
        rich_help_panel=AUGMENT_PANEL,
    ),
]
RatioOption = Annotated[
    float,
    typer.Option(help="Extra fraud sequences per real fraud.", rich_help_panel=AUGMENT_PANEL),
]
FamilyOption = Annotated[
    str,
    typer.Option(
        help=f"Model family: {', '.join(FAMILIES)} (how the customer's sequence is read).",
    ),
]
GanStepsOption = Annotated[
    int, typer.Option(help="GAN generator steps.", rich_help_panel=AUGMENT_PANEL)
]


def training_settings(
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
    family: str = DEFAULT_FAMILY.value,
) -> tuple[TrainConfig, AugmentConfig]:
    """The training and augmentation settings the shared options describe.

    Raises:
        ConfigError: ``augment`` names no mode, ``augment_ratio`` is negative, or ``family``
            names no model family.
    """
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
    try:
        model = replace(ModelConfig(), family=family, hidden_size=hidden_size)
    except ValueError as exc:
        raise ConfigError(f"--family / --hidden-size: {exc}") from None
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
        model=model,
    )
    gan = replace(GanConfig(), generator_steps=gan_steps, threads=threads)
    return train, AugmentConfig(mode=mode, ratio=augment_ratio, gan=gan)


def fail(exc: Exception) -> typer.Exit:
    """Print ``error: <exc>`` on stderr; return the exit (code 2) for the caller to raise."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(code=2)


def command_line(ctx: typer.Context) -> str:
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


def given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was on the command line (or in the environment), rather
    than left to its default: a default may be fitted to the data, a given value not."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
