"""The ``fraudstream`` command: a thin layer wiring the live service and the offline tools.

Serving commands live here; the offline commands are registered from
:mod:`training.commands`, which imports its heavy dependencies (torch, pandas) only when a
command runs, so ``fraudstream worker --help`` works in a slim serving install.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from stream_app.config import Settings
    from stream_app.state.guard import Updates

app = typer.Typer(
    name="fraudstream",
    help="Real-time fraud detection over Kafka, Redis and ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Plain help, wrapped to the terminal: rich's tables cut long option names and words
    # with an ellipsis at 80 columns (--compromised-terminals-per-…).
    rich_markup_mode=None,
)


@dataclass(frozen=True)
class CommandSpec:
    """A command defined outside this module: where it lives and what it needs.

    Args:
        target: ``module:attribute``, a command function or a ``typer.Typer`` group.
        extra: The extra that brings what it imports when it runs.
        modules: Those modules: a command run without its extra says which install brings
            it, instead of a traceback.
    """

    target: str
    extra: str
    modules: tuple[str, ...]


_DATA = ("pandas", "pyarrow")
# Every command not defined in this module, in ``--help`` order: the one place commands are
# registered (by :func:`register_commands`). The worker, ``rebuild-state`` and ``settings``
# are defined below.
COMMANDS: Final[dict[str, CommandSpec]] = {
    "simulate": CommandSpec("training.commands.simulate:simulate_command", "demo", _DATA),
    "replay": CommandSpec("training.ops.stream_commands:replay_command", "demo", _DATA),
    "score-file": CommandSpec("training.commands.score_file:score_file_command", "demo", _DATA),
    "demo": CommandSpec("training.ops.stream_commands:demo_command", "demo", _DATA),
    "bench": CommandSpec("training.ops.bench_commands:bench_command", "demo", _DATA),
    "train": CommandSpec(
        "training.commands.train:train_command", "train", ("torch", "onnx", "onnxscript", "sklearn")
    ),
    "evaluate": CommandSpec(
        "training.commands.evaluate:evaluate_command",
        "train",
        ("torch", "sklearn", "xgboost", "matplotlib"),
    ),
    "export": CommandSpec(
        "training.commands.export:export_command", "train", ("torch", "onnx", "onnxscript")
    ),
    "console": CommandSpec(
        "stream_app.console.commands:console_app",
        "console",
        ("starlette", "jinja2", "uvicorn", "argon2"),
    ),
    # reads the console's case store (PostgreSQL through psycopg); Parquet asks for pyarrow
    "labels": CommandSpec("stream_app.console.export:labels_app", "console", ("psycopg",)),
}
COMMAND_EXTRAS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    name: (spec.extra, spec.modules) for name, spec in COMMANDS.items()
}


def missing_extra(command: str) -> str | None:
    """Why ``command`` cannot run in this install (the extra to add), or None."""
    extra, modules = COMMAND_EXTRAS.get(command, ("", ()))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (
        f"`fraudstream {command}` needs {', '.join(missing)}, from the {extra!r} extra: "
        f'pip install "fraudstream[{extra}]" (in a checkout: pip install -e ".[{extra}]")'
    )


class _Commands(TyperGroup):
    """The root command group: refuses a command whose extra is not installed (not its help)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:  # typer's own click types
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and "--help" not in rest:
            problem = missing_extra(name)
            if problem is not None:
                fail(problem)
        return name, command, rest


@app.callback(cls=_Commands)
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
        from stream_app.worker.app import run_worker

        code = run_worker(settings)
    except ConfigError as exc:
        fail(str(exc))
    except ModelError as exc:
        fail(
            f"{exc}\nthe worker needs a model: train one (fraudstream train ...) or point "
            "FRAUDSTREAM_MODEL_DIR at a model directory"
        )
    raise typer.Exit(code=code)


_REBUILD_HELP = (
    "Rebuild the customer and terminal state in Redis after it was lost (the worker says so: "
    "fraudstream_state_lost, an ERROR log, the FraudstreamStateLost alert).\n\n"
    "Transactions and labels are pushed through the worker's own state store, in event-time "
    "order, after the prefix's partial state is deleted; then a new state marker is written, "
    "which running workers take as the end of the loss. Sources: --from-topics (the retained "
    "transactions and labels topics, up to the consumer groups' committed offsets) or --data "
    "(a transactions file as `fraudstream simulate` writes it; its TX_FRAUD column gives the "
    "labels); or --accept-as-is to keep the partial state and only end the alert. Settings "
    "come from the FRAUDSTREAM_* variables, as for the worker. Stop the "
    "workers first: events they score meanwhile would interleave with the rebuilt history."
)


@app.command("rebuild-state", help=_REBUILD_HELP)
def rebuild_state_command(
    from_topics: Annotated[
        bool,
        typer.Option(
            "--from-topics",
            help="Read the transactions and labels topics from their start up to the "
            "consumer groups' committed offsets.",
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Transactions file (.parquet or .csv) with a TX_FRAUD column.", dir_okay=False
        ),
    ] = None,
    labels_delay: Annotated[
        str,
        typer.Option(
            help="With --data: when each fraud's label counts, after its transaction (any "
            "delay under the 7-day label delay gives the same state)."
        ),
    ] = "1h",
    force: Annotated[
        bool,
        typer.Option(help="Rebuild even though the state marker says the state is intact."),
    ] = False,
    accept_as_is: Annotated[
        bool,
        typer.Option(
            "--accept-as-is",
            help="Rebuild nothing: accept the state as it is (what the workers wrote since "
            "the loss) and write a new marker, which clears the workers' state-lost flag. "
            "For when the topics no longer hold what was lost.",
        ),
    ] = False,
) -> None:
    """Rebuild the state (the help text is ``_REBUILD_HELP``)."""
    import asyncio

    from stream_app.config import load_settings
    from stream_app.errors import ConfigError, ModelError

    if sum((from_topics, data is not None, accept_as_is)) != 1:
        fail("give exactly one of --from-topics, --data FILE or --accept-as-is")
    try:
        settings = load_settings()
        code = asyncio.run(_rebuild(settings, data, labels_delay, force, accept_as_is))
    except ConfigError as exc:
        fail(str(exc))
    except ModelError as exc:
        fail(
            f"{exc}\nthe state keeps as many transactions as the model reads: point "
            "FRAUDSTREAM_MODEL_DIR at the workers' model or set FRAUDSTREAM_STATE_SEQUENCE_LENGTH"
        )
    raise typer.Exit(code=code)


async def _rebuild(
    settings: Settings, data: Path | None, labels_delay: str, force: bool, accept_as_is: bool
) -> int:
    """``rebuild-state``: returns the exit code."""
    from datetime import timedelta

    from aiokafka.errors import KafkaError
    from redis.exceptions import RedisError

    from stream_app.models.card import load_card
    from stream_app.models.registry import resolve_model_dir
    from stream_app.records import ValidationLimits
    from stream_app.state.guard import (
        read_marker,
        rebuild_state,
        store_marker_key,
        topic_updates,
        write_marker,
    )
    from stream_app.worker.runtime import check_redis_mode, state_store

    length = settings.state_sequence_length
    if length is None:
        locations = [settings.model_dir, settings.challenger_model_dir]
        length = max(load_card(resolve_model_dir(p)).sequence_length for p in locations if p)
    limits = ValidationLimits(
        max_payload_bytes=settings.max_payload_bytes,
        max_future=timedelta(seconds=settings.max_clock_skew_s),
    )
    store = state_store(settings, length)
    try:
        try:
            await check_redis_mode(store.client, settings)
            marker = await read_marker(store.client, store_marker_key(store))
        except RedisError as exc:
            fail(f"cannot reach Redis at {settings.redis_display_url} ({type(exc).__name__})")
        if marker is not None and not force:
            fail(
                f"the state marker {store_marker_key(store)} is there (epoch "
                f"{marker.epoch[:8]}, {marker.origin}, {marker.created_at}): the state is not "
                "lost; pass --force to rebuild it anyway"
            )
        if accept_as_is:
            epoch = await write_marker(
                store.client,
                store_marker_key(store),
                "rebuild-state",
                "the state as it was, accepted without a rebuild (--accept-as-is)",
            )
            sys.stdout.write(f"accepted the state as it is; new state epoch {epoch[:8]}\n")
            return 0
        if data is not None:
            try:
                updates = _file_updates(data, labels_delay, settings.topic_labels)
            except ImportError as exc:  # a worker-only install: no pandas to read the file
                fail(
                    f"rebuild-state --data needs {exc.name}, from the 'demo' extra: "
                    'pip install "fraudstream[demo]" (or rebuild with --from-topics)'
                )
        else:
            try:
                updates = await topic_updates(settings, limits)
            except KafkaError as exc:
                fail(
                    f"cannot read the topics from Kafka at {settings.kafka_bootstrap_servers} "
                    f"({type(exc).__name__}: {exc}): check FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS"
                )
        report = await rebuild_state(store, updates)
    finally:
        await store.client.aclose()
    sys.stdout.write(f"{report}\n")
    return 0


def _file_updates(path: Path, labels_delay: str, labels_topic: str) -> Updates:
    """A transactions file's transactions, and its frauds' labels ``labels_delay`` later,
    as the replay publishes them (ids as strings, epoch-ms times)."""
    from stream_app.records import label_json
    from stream_app.scoring.pipeline import Inbound, pack_source
    from stream_app.state.guard import Updates
    from stream_app.state.store import LabelUpdate, TransactionUpdate
    from training.ops.replay import parse_duration
    from training.transactions import read_transactions, to_arrays

    arrays = to_arrays(read_transactions(path))
    delay_ms = int(parse_duration(labels_delay).total_seconds() * 1000)
    updates = Updates([], [], source=f"file {path}")
    rows = zip(
        arrays.transaction_ids.tolist(),
        arrays.customer_ids.tolist(),
        arrays.terminal_ids.tolist(),
        arrays.times_ms.tolist(),
        arrays.amounts.tolist(),
        arrays.is_fraud.tolist(),
        strict=True,
    )
    for n, (tx, customer, terminal, time_ms, amount, fraud) in enumerate(rows):
        updates.transactions.append(
            (time_ms, n, TransactionUpdate(str(tx), str(customer), str(terminal), time_ms, amount))
        )
        if fraud:
            reported = time_ms + delay_ms
            payload = label_json(tx, customer, terminal, time_ms, True, reported)
            # Its source, as if it had come from the labels topic (offset -1: it did not).
            source = pack_source(
                Inbound(labels_topic, 0, -1, str(customer).encode(), payload, reported)
            )
            label = LabelUpdate(
                str(tx), str(customer), str(terminal), time_ms, True, reported, source
            )
            updates.labels.append((reported, n, label))
    return updates


@app.command("settings")
def settings_command(
    reference: Annotated[
        bool,
        typer.Option(
            "--reference",
            help="Print the reference instead: every setting's default and description as "
            "the README's Markdown table.",
        ),
    ] = False,
) -> None:
    """Show the settings the worker would use: value and source (default or environment).

    Secrets are masked. An invalid value exits with code 2 and says which variable to fix.
    """
    from stream_app.config import effective_settings, settings_table
    from stream_app.errors import ConfigError

    if reference:
        sys.stdout.write(settings_table())
        return
    try:
        rows = effective_settings()
    except ConfigError as exc:
        fail(str(exc))
    width = max(len(variable) for variable, _, _ in rows)
    for variable, value, source in rows:
        origin = {"default": "", variable: "  (environment)"}.get(source, f"  ({source})")
        line = f"{variable:<{width}}  {value}{origin}"
        if len(line) > 80:  # a long value: drop the padding, not the words
            line = f"{variable}  {value}{origin}"
        sys.stdout.write(line + "\n")
    changed = sum(1 for _, _, source in rows if source != "default")
    sys.stdout.write(f"\n{changed} of {len(rows)} set by the environment, the rest defaults\n")


_registered = False


def register_commands() -> None:
    """Add every command of :data:`COMMANDS` to the application (once).

    The offline commands come with the ``training`` package, which a serving-only install
    (the worker image) does not have: then they are left out. Otherwise a command whose
    module fails to import raises: a broken command is an error, never a silently missing
    one. Each module imports only typer at module level, so this stays fast.
    """
    global _registered
    if _registered:
        return
    offline = importlib.util.find_spec("training") is not None
    for name, spec in COMMANDS.items():
        module_name, _, attribute = spec.target.partition(":")
        if module_name.split(".")[0] == "training" and not offline:
            continue
        target = getattr(importlib.import_module(module_name), attribute)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    _registered = True


def main() -> None:
    """Entry point of the ``fraudstream`` console script."""
    register_commands()
    app()


if __name__ == "__main__":
    main()
