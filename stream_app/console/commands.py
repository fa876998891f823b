"""``fraudstream console``: serve the review console, and manage its users.

Registered on the main command by :mod:`stream_app.cli`. The web stack is imported only
when a command runs, so ``fraudstream --help`` works without the ``console`` extra.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

console_app = typer.Typer(
    name="console",
    no_args_is_help=False,
    rich_markup_mode=None,
)


def _fail(message: str) -> None:
    from stream_app.cli import fail

    fail(message)


@console_app.callback(invoke_without_command=True)
def serve(ctx: typer.Context) -> None:
    """Serve the review console (settings: FRAUDSTREAM_CONSOLE_* and the worker's Kafka
    and topic variables).

    It consumes the alerts topic into its case store (SQLite by default, PostgreSQL by
    FRAUDSTREAM_CONSOLE_DATABASE_URL) and publishes verdicts on the labels topic. Create a
    user first: fraudstream console add-user NAME --role analyst.
    """
    if ctx.invoked_subcommand is not None:
        return
    from stream_app.config import load_settings
    from stream_app.errors import ConfigError

    try:
        from stream_app.console.service import run_console
        from stream_app.console.settings import load_console_settings
        from stream_app.console.store import StoreError

        settings = load_settings()
        console = load_console_settings()
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        code = run_console(settings, console)
    except ImportError as exc:
        _fail(f"the console needs its extra: pip install 'fraudstream[console]' ({exc.name})")
        return
    except (ConfigError, StoreError) as exc:
        _fail(str(exc))
        return
    raise typer.Exit(code=code)


@console_app.command("add-user")
def add_user(
    username: Annotated[str, typer.Argument(help="Lower-case user name.")],
    role: Annotated[
        str, typer.Option(help="analyst, supervisor or admin.", show_default=True)
    ] = "analyst",
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin", help="Read the password from standard input (for scripts)."
        ),
    ] = False,
    replace: Annotated[
        bool,
        typer.Option(help="Set the password and role of an existing user instead of failing."),
    ] = False,
) -> None:
    """Create a console user with a role; the password is asked for (or read from stdin)."""
    from stream_app.errors import ConfigError

    try:
        from stream_app.console import auth
        from stream_app.console.settings import load_console_settings
        from stream_app.console.store import CaseStore, StoreError
    except ImportError as exc:
        _fail(f"the console needs its extra: pip install 'fraudstream[console]' ({exc.name})")
        return
    problem = auth.username_problem(username)
    if problem:
        _fail(problem)
    if role not in {r.value for r in auth.Role}:
        _fail(f"--role must be analyst, supervisor or admin, got {role!r}")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    problem = auth.password_problem(password)
    if problem:
        _fail(problem)
    try:
        console = load_console_settings()
        store = CaseStore(console.database_url.get_secret_value())
        try:
            store.create_schema()
            created = store.add_user(username, auth.hash_password(password), role, replace=replace)
        finally:
            store.close()
    except (ConfigError, StoreError) as exc:
        _fail(str(exc))
        return
    if not created:
        _fail(f"user {username!r} exists: add --replace to set a new password and role")
    typer.echo(f"user {username} ({role}) saved in {console.database_display_url}")
