"""Offline commands of the ``fraudstream`` CLI, one module per command.

* :mod:`~training.commands.simulate`: ``simulate``, labelled transactions;
* :mod:`~training.commands.train`: ``train``, the LSTM, its thresholds and its export;
* :mod:`~training.commands.export`: ``export``, a trained model to ONNX again, parity checked;
* :mod:`~training.commands.evaluate`: ``evaluate``, the Handbook's protocol over every model;
* :mod:`~training.commands.score_file`: ``score-file``, offline scoring as the worker would;
* :mod:`~training.commands.options`: the options, settings and error output they share;
* :mod:`~training.commands.progress`: the epoch progress bars of train and evaluate.

Only typer is imported at module level; each command imports what it needs when it runs, so
``--help`` works without torch or pandas.
"""

from __future__ import annotations

import typer

from training.commands.evaluate import evaluate_command
from training.commands.export import export_command
from training.commands.score_file import score_file_command
from training.commands.simulate import simulate_command
from training.commands.train import train_command


def register(app: typer.Typer) -> None:
    """Add the offline commands to the ``fraudstream`` application."""
    app.command("simulate")(simulate_command)
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("export")(export_command)
    app.command("score-file")(score_file_command)
