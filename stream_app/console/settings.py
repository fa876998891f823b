"""The console's settings: ``FRAUDSTREAM_CONSOLE_*`` variables, read once, validated at start-up.

Kafka connection and topic names are the worker's (:class:`stream_app.config.Settings`), so
the console reads the same ``alerts`` and writes the same ``labels`` topics as the worker it
sits beside. What only the console needs lives here, in its own class: the worker neither
reads nor validates it (a console's database URL cannot stop a worker), and the worker's
settings table in the README stays the worker's.
"""

from __future__ import annotations

import secrets
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream_app.config import redact_url
from stream_app.errors import ConfigError

CONSOLE_ENV_PREFIX: Final = "FRAUDSTREAM_CONSOLE_"
DEFAULT_DATABASE_URL: Final = "sqlite:///fraudstream-console.db"
# A key shorter than this is guessable offline from one signed cookie.
MIN_SECRET_KEY_CHARS: Final = 32


class ConsoleSettings(BaseSettings):
    """Everything the review console can be told from outside (besides the Kafka settings)."""

    model_config = SettingsConfigDict(
        env_prefix=CONSOLE_ENV_PREFIX,
        frozen=True,
        extra="ignore",
        env_ignore_empty=True,
        validate_default=True,
    )

    database_url: SecretStr = Field(
        SecretStr(DEFAULT_DATABASE_URL),
        description="Case store: sqlite:///PATH (default, a file next to where it runs) or "
        "postgresql://user:pass@host/db (secret: it may hold a password).",
    )
    host: str = Field("127.0.0.1", description="Address the web server listens on.")
    port: int = Field(8400, ge=1, le=65535, description="Port of the web server.")
    secret_key: SecretStr | None = Field(
        None,
        description="Key signing the session cookies, at least 32 characters (secret). "
        "Unset: a random key per start (everyone logs in again after a restart; replicas "
        "must share one).",
    )
    cookie_secure: bool = Field(
        True,
        description="Send the session cookie over HTTPS only; false only for plain-HTTP local use.",
    )
    session_max_age_s: int = Field(
        8 * 3600, ge=60, le=7 * 86_400, description="A login lasts this long (s)."
    )
    sla_s: float = Field(
        4 * 3600,
        gt=0,
        le=30 * 86_400,
        description="Time an open case may wait for a verdict (s); older cases are "
        "flagged in the queue.",
    )
    history_days: float = Field(
        7.0,
        ge=0,
        le=400,
        description="Days of scored transactions (the scores topic) kept for the case "
        "view's customer and terminal timelines; 0 reads no scores.",
    )
    page_size: int = Field(50, ge=5, le=500, description="Cases per queue page.")
    login_max_failures: int = Field(
        5,
        ge=1,
        le=1000,
        description="Failed logins per user name or client address within the window "
        "before further attempts are refused.",
    )
    login_window_s: float = Field(
        300.0, gt=0, le=86_400, description="Window of the login rate limit (s)."
    )
    metrics_port: int = Field(
        9301,
        ge=0,
        le=65535,
        description="Port of the console's Prometheus endpoint (on the web server's "
        "address); 0 turns it off.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ConsoleSettings:
        problems = []
        url = self.database_url.get_secret_value()
        scheme = urlsplit(url).scheme
        if scheme not in ("sqlite", "postgresql", "postgres"):
            problems.append(
                f"{CONSOLE_ENV_PREFIX}DATABASE_URL must start with sqlite:/// or "
                f"postgresql://, got {redact_url(url)!r}"
            )
        elif scheme == "sqlite" and not url.startswith("sqlite:///"):
            problems.append(
                f"{CONSOLE_ENV_PREFIX}DATABASE_URL: write a SQLite file as sqlite:///PATH "
                "(three slashes, then a relative or /absolute path)"
            )
        key = self.secret_key
        if key is not None and len(key.get_secret_value()) < MIN_SECRET_KEY_CHARS:
            problems.append(
                f"{CONSOLE_ENV_PREFIX}SECRET_KEY must be at least {MIN_SECRET_KEY_CHARS} "
                "characters (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe())')"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def session_secret(self) -> str:
        """The cookie signing key; a random one when none is set (sessions end on restart)."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        return _RANDOM_KEY

    @property
    def database_display_url(self) -> str:
        """The database URL with any password masked, fit for logs."""
        return redact_url(self.database_url.get_secret_value())


_RANDOM_KEY: Final = secrets.token_urlsafe(48)


def console_env_name(field: str) -> str:
    """The environment variable of a console setting, e.g. ``FRAUDSTREAM_CONSOLE_PORT``."""
    return CONSOLE_ENV_PREFIX + field.upper()


def load_console_settings(**overrides: Any) -> ConsoleSettings:
    """Read the console settings from the environment (``overrides`` win).

    Raises:
        ConfigError: every problem found, each naming its variable; secrets never shown.
    """
    try:
        return ConsoleSettings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            field = str(loc[0]) if loc else ""
            if field not in ConsoleSettings.model_fields:
                lines.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            annotation = ConsoleSettings.model_fields[field].annotation
            secret = annotation is SecretStr or annotation == (SecretStr | None)
            given = "" if secret else f" (got {error.get('input')!r})"
            lines.append(f"{console_env_name(field)}: {error['msg']}{given}")
        raise ConfigError("invalid console settings:\n  " + "\n  ".join(lines)) from None


def console_settings_table() -> str:
    """The Markdown table of the console's settings (variable, default, description)."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, info in ConsoleSettings.model_fields.items():
        default = info.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if isinstance(default, bool):
            text = "true" if default else "false"
        else:
            text = "unset" if default is None else str(default)
        description = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{console_env_name(name)}` | `{text}` | {description} |")
    return "\n".join(rows) + "\n"
