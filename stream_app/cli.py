"""The ``fraudstream`` command: a thin layer wiring the live service and the offline tools.

Serving commands live here; the offline commands are registered from
:mod:`training.commands`, which imports its heavy dependencies (torch, pandas) only when a
command runs, so ``fraudstream worker --help`` works in a slim serving install.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fraudstream",
    help="Real-time fraud detection over Kafka, Redis and ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Real-time fraud detection over Kafka, Redis and ONNX Runtime."""


def _register_training_commands() -> None:
    try:
        from training import commands
    except ImportError:  # a serving-only install ships without the training package
        return
    commands.register(app)


def main() -> None:
    """Entry point of the ``fraudstream`` console script."""
    _register_training_commands()
    app()


if __name__ == "__main__":
    main()
