"""The ``score-file`` command: offline scoring of a transactions file, as the worker would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stream_app.config import Settings
from training.commands.options import fail

# The worker's default model: the same file is scored offline as online.
DEFAULT_MODEL_DIR: Path = Settings.model_fields["model_dir"].default


def score_file_command(
    data: Annotated[Path, typer.Option(help="Transactions file to score.", dir_okay=False)],
    out: Annotated[
        Path, typer.Option(help="Scores file to write; .parquet or .csv.", dir_okay=False)
    ],
    model_dir: Annotated[
        Path | None,
        typer.Option(
            help="Model directory (model.onnx and model_card.json); default the worker's "
            f"model (FRAUDSTREAM_MODEL_DIR, else {DEFAULT_MODEL_DIR}).",
            envvar="FRAUDSTREAM_MODEL_DIR",
            show_envvar=False,
            file_okay=False,
        ),
    ] = None,
    # The name before the commands agreed on --model-dir; kept, hidden, for old scripts.
    model: Annotated[Path | None, typer.Option(hidden=True, file_okay=False)] = None,
) -> None:
    """Score every transaction of a file offline, as the worker would, and write the scores.

    On a file with labels it also prints AUC ROC, average precision and card precision@100.
    """
    model = model_dir or model or DEFAULT_MODEL_DIR
    if not model.exists():
        raise fail(
            ValueError(
                f"no model directory at {model} (from {Path.cwd()}): pass --model-dir, e.g. "
                "the onnx_models/default folder of a fraudstream checkout"
            )
        )
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
        raise fail(exc) from exc
    seconds = time.perf_counter() - started
    table = Table(title=f"{len(scored.table):,} transactions scored by {scored.model_version}")
    table.add_column("Decision")
    table.add_column("Transactions", justify="right")
    table.add_column("Share", justify="right")
    counts = scored.table["decision"].value_counts()
    for decision, count in counts.items():
        table.add_row(str(decision), f"{count:,}", f"{count / max(len(scored.table), 1):.2%}")
    console.print(table)
    if scored.quality is not None:
        # The file has labels (TX_FRAUD): how well the scores rank them, as `evaluate` says.
        quality = scored.quality
        console.print(
            f"against the file's labels: AUC ROC {quality['auc_roc']:.3f}, average "
            f"precision {quality['average_precision']:.3f}, card precision@100 "
            f"{quality['card_precision_at_100']:.3f}"
        )
    rate = len(scored.table) / seconds if seconds > 0 else float("inf")
    console.print(f"{seconds:.1f} s ({rate:,.0f} transactions/s); written to {escape(str(out))}")
