"""The ``export`` command: a trained model to ONNX with its card, after the parity check.

``train`` ends with the same export (:func:`training.export.export_model`); this command runs
it again on the directory ``train`` wrote, e.g. after an upgrade of torch or ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from training.commands.options import fail

if TYPE_CHECKING:  # annotations only: the command imports these when it runs
    from rich.console import Console

    from stream_app.models.card import ModelCard

# The contract's tolerance, a literal so that `--help` imports nothing heavy;
# tests/training/test_commands.py checks it against training.export.PARITY_TOLERANCE.
_TOLERANCE = 1e-5


def export_command(
    out: Annotated[
        Path,
        typer.Option(
            help="Model directory to write (model.onnx, model_card.json and model.pt).",
            file_okay=False,
        ),
    ],
    model_dir: Annotated[
        Path | None,
        typer.Option(
            help="Trained model directory: model.pt and model_card.json, as `fraudstream "
            "train` writes them. Required.",
            file_okay=False,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Transactions file the model was trained on (checked by SHA-256); its test "
            "rows are the parity sequences. Default: the file the card names.",
            dir_okay=False,
        ),
    ] = None,
    parity_tolerance: Annotated[
        float,
        typer.Option(
            help="Largest accepted |PyTorch - ONNX| score difference, at batch 1 and batch N; "
            "at most the contract's 1e-5.",
        ),
    ] = _TOLERANCE,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    # The name before the commands agreed on --model-dir; kept, hidden, for old scripts.
    model: Annotated[Path | None, typer.Option(hidden=True, file_okay=False)] = None,
) -> None:
    """Export a trained model to ONNX with its model card; refuse it if ONNX != PyTorch."""
    model = model_dir or model
    if model is None:
        raise fail(ValueError("--model-dir is required: the directory `fraudstream train` wrote"))
    from rich.console import Console

    from stream_app.errors import FraudStreamError
    from training.export import export_trained

    try:
        card = export_trained(
            model, out, data=data, tolerance=parity_tolerance, overwrite=overwrite
        )
    except FraudStreamError as exc:
        raise fail(exc) from exc
    print_card(Console(), card, out)


def print_card(console: Console, card: ModelCard, out: Path) -> None:
    """What an exported model's card says: metrics, thresholds, training, parity."""
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
    parity = card.parity
    worst = max(parity["max_abs_diff_batch_1"], parity["max_abs_diff_batch_n"])
    table.add_row(
        "ONNX parity",
        f"max |PyTorch - ONNX| {worst:.2e} on {parity['sequences']} sequences "
        f"(tolerance {parity['tolerance']:g})",
    )
    console.print(table)
    console.print(f"written to {escape(str(out))}")
