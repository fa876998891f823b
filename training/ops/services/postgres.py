"""A throwaway PostgreSQL server for tests and local runs: initdb + pg_ctl in a folder.

The review console's case store runs on PostgreSQL in deployments; its tests start a real
server rather than assume one: a fresh cluster in a temporary folder, listening only on
127.0.0.1 at a free port, authenticated by password, stopped (``pg_ctl stop -m immediate``)
and deleted afterwards. Debian's server binaries live in ``/usr/lib/postgresql/<major>/bin``
(not on PATH); ``FRAUDSTREAM_PG_BIN`` overrides the search.

PostgreSQL refuses to run as root: under root the cluster is created and run as the
``postgres`` system user (``runuser``), and the folder is given to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from stream_app.errors import ConfigError
from training.ops.services.net import LOOPBACK, free_port, wait_for_port

_START_TIMEOUT_S: Final = 60.0
_SYSTEM_USER: Final = "postgres"


def postgres_bin() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest Debian major, or PATH).

    Raises:
        ConfigError: no PostgreSQL server is installed.
    """
    override = os.environ.get("FRAUDSTREAM_PG_BIN")
    if override:
        return Path(override)
    majors = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if majors:
        return majors[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise ConfigError(
        "no PostgreSQL server found: apt-get install postgresql (or set FRAUDSTREAM_PG_BIN "
        "to the folder holding initdb and pg_ctl)"
    )


class PostgresServer:
    """A PostgreSQL cluster of its own: ``start()``, ``url``, ``stop()`` (or ``with``)."""

    def __init__(self, *, database: str = "fraudstream", user: str = "fraudstream") -> None:
        self.database = database
        self.user = user
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self._bin = postgres_bin()
        self._dir: Path | None = None
        self._as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        """``postgresql://`` URL of the database, with the password."""
        return f"postgresql://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{self.database}"

    def _run(self, *argv: str, timeout_s: float = 120.0) -> None:
        command = [str(self._bin / argv[0]), *argv[1:]]
        if self._as_root:
            command = ["runuser", "-u", _SYSTEM_USER, "--", *command]
        env = {**os.environ, "PGPASSWORD": self.password}  # psql's, never on a command line
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> None:
        """Create the cluster and its database, and start the server on a free port."""
        # Under root, the postgres user must reach the folder: TMPDIR may be a private one
        # (the test session's), so the folder goes straight into the system's /tmp.
        self._dir = Path(
            tempfile.mkdtemp(prefix="fraudstream-pg-", dir="/tmp" if self._as_root else None)
        )
        data = self._dir / "data"
        pwfile = self._dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            account = pwd.getpwnam(_SYSTEM_USER)
            for path in (self._dir, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(self._dir, 0o700)
        self._run(
            "initdb", "-D", str(data), "-U", self.user, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions",
        )  # fmt: skip
        self.port = free_port()
        options = (
            f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self._dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self._dir / "server.log"), "-o", options,
            "-w", "-t", str(int(_START_TIMEOUT_S)), "start",
        )  # fmt: skip
        if not wait_for_port(LOOPBACK, self.port, _START_TIMEOUT_S):
            raise RuntimeError(f"PostgreSQL did not listen on {LOOPBACK}:{self.port}")
        self._run(
            "psql", "-h", LOOPBACK, "-p", str(self.port), "-U", self.user, "-d", "postgres",
            "-c", f"CREATE DATABASE {self.database}",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server at once and delete its folder."""
        if self._dir is None:
            return
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self._dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
