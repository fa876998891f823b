"""A throw-away review console: ``fraudstream console`` as a subprocess, with one user.

Used by ``fraudstream demo`` and by the tests that need a real console process (the live
monitoring test scrapes its metrics). It runs on free loopback ports with a SQLite case
store in a folder the caller owns and removes, a random cookie key, and plain-HTTP cookies
(``FRAUDSTREAM_CONSOLE_COOKIE_SECURE=false``: the browser talks to it over http://).
The user is created the way an operator would, with ``fraudstream console add-user
--password-stdin``, and gets a random password.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

from packaging.requirements import Requirement

from stream_app.config import Settings, settings_environment
from stream_app.errors import ConfigError
from training.ops.services.net import LOOPBACK, free_port, wait_for_port

CONSOLE_EXTRA: Final = "console"
_START_TIMEOUT_S: Final = 60.0


def console_extra_missing() -> list[str]:
    """The distributions of the ``console`` extra (as pyproject.toml lists them) that are
    not installed; empty when ``fraudstream console`` can run."""
    missing = []
    for text in metadata.requires("fraudstream") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or not marker.evaluate({"extra": CONSOLE_EXTRA}):
            continue
        if marker.evaluate({"extra": ""}):
            continue  # a base dependency whose marker is about the platform
        try:
            metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(requirement.name)
    return missing


@dataclass(frozen=True)
class ConsoleLogin:
    """Where a console is and how to log in to it."""

    url: str
    username: str
    password: str


class LocalConsole:
    """``fraudstream console`` on free loopback ports, its case store in ``folder``.

    Args:
        settings: The worker's settings (Kafka, topics, group id): the console reads the
            same alerts topic and writes the same labels topic.
        folder: Holds the SQLite case store and the log; the caller removes it.
        username: The user created before the console starts (role ``role``).
    """

    def __init__(
        self,
        settings: Settings,
        folder: Path,
        *,
        username: str = "demo",
        role: str = "supervisor",
    ) -> None:
        self.username = username
        self.role = role
        self.password = secrets.token_urlsafe(12)
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = folder / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._env = {
            **os.environ,
            **settings_environment(settings),
            "FRAUDSTREAM_CONSOLE_DATABASE_URL": f"sqlite:///{folder / 'console.db'}",
            "FRAUDSTREAM_CONSOLE_HOST": LOOPBACK,
            "FRAUDSTREAM_CONSOLE_PORT": str(self.port),
            "FRAUDSTREAM_CONSOLE_METRICS_PORT": str(self.metrics_port),
            "FRAUDSTREAM_CONSOLE_COOKIE_SECURE": "false",
            "FRAUDSTREAM_CONSOLE_SECRET_KEY": secrets.token_urlsafe(48),
        }

    @property
    def url(self) -> str:
        """Where the console's pages are."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The console's Prometheus endpoint."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def login(self) -> ConsoleLogin:
        """Where to log in, and as whom."""
        return ConsoleLogin(self.url, self.username, self.password)

    def start(self, *, wait: bool = True) -> None:
        """Create the user and start the console; with ``wait``, until its pages answer.

        Raises:
            ConfigError: the user could not be created or the console did not start;
                the message ends with the console's own words.
        """
        command = [sys.executable, "-m", "stream_app.cli", "console"]
        created = subprocess.run(
            [*command, "add-user", self.username, "--role", self.role, "--password-stdin"],
            input=self.password + "\n",
            env=self._env,
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_S,
        )
        if created.returncode != 0:
            raise ConfigError(f"cannot create the console's user: {created.stderr.strip()}")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C on the terminal reaches the caller only, which
                # stops the console with SIGTERM.
                start_new_session=True,
            )
        if wait and not wait_for_port(LOOPBACK, self.port, _START_TIMEOUT_S):
            self.check_alive()
            self.stop(0.0)
            raise ConfigError(f"the review console did not answer within {_START_TIMEOUT_S} s")

    def answering(self) -> bool:
        """Whether the console accepts connections now (one short attempt)."""
        return wait_for_port(LOOPBACK, self.port, 0.2)

    def check_alive(self) -> None:
        """Raises :class:`ConfigError` with the end of its log if the console exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ConfigError(
                f"the review console exited with code {self.process.returncode}:\n{tail}"
            )

    def signal_stop(self) -> None:
        """Ask the console to stop (SIGTERM) without waiting: see :meth:`stop`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the console: SIGTERM, then SIGKILL after ``grace_s``."""
        if self.process is None:
            return
        self.signal_stop()
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
