"""The ``fraudstream`` command: a thin layer wiring the live service and the offline tools.

Serving commands live here; the offline commands are registered from
:mod:`training.commands`, which imports its heavy dependencies (torch, pandas) only when a
command runs, so ``fraudstream worker --help`` works in a slim serving install.
"""

from __future__ import annotations

import sys
from typing import NoReturn

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


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit: for mistakes the user can fix."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code=code)


_WORKER_HELP = (
    "Run the real-time scoring worker; settings come from FRAUDSTREAM_* variables.\n\n"
    "It consumes transactions and labels from Kafka, keeps state in Redis, scores with the "
    "ONNX model and publishes scores, alerts and dead letters. SIGTERM drains and stops. "
    "`fraudstream settings` lists every setting."
)


@app.command("worker", help=_WORKER_HELP)
def worker_command() -> None:
    """Run the real-time scoring worker (the help text is ``_WORKER_HELP``)."""
    from stream_app.config import load_settings
    from stream_app.errors import ConfigError, ModelError

    try:
        settings = load_settings()
        from stream_app.worker import run_worker

        code = run_worker(settings)
    except ConfigError as exc:
        fail(str(exc))
    except ModelError as exc:
        fail(
            f"{exc}\nthe worker needs a model: train one (fraudstream train ...) or point "
            "FRAUDSTREAM_MODEL_DIR at a model directory"
        )
    raise typer.Exit(code=code)


@app.command("settings")
def settings_command() -> None:
    """Print every setting as a Markdown table: variable, default, description."""
    from stream_app.config import settings_table

    sys.stdout.write(settings_table())


_registered = False


def _register_training_commands() -> None:
    """Add the offline, replay/demo and bench commands (once) when ``training`` is there."""
    global _registered
    if _registered:
        return
    try:
        from training import bench_commands, commands, stream_commands
    except ImportError:  # a serving-only install ships without the training package
        return
    commands.register(app)
    stream_commands.register_stream_commands(app)
    bench_commands.register_bench_command(app)
    _registered = True


def main() -> None:
    """Entry point of the ``fraudstream`` console script."""
    _register_training_commands()
    app()


if __name__ == "__main__":
    main()
