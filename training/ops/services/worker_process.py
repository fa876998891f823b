"""``fraudstream worker`` as a subprocess, and its metrics: for the demo, the bench and tests.

The one way a tool or a test runs a worker of its own: the settings go in as the
environment the worker reads (:func:`stream_app.config.settings_environment`), its metrics
endpoint on a port of its own tells when it is ready and what it has done
(:func:`scrape_metrics`), and it is stopped for real: SIGTERM (a drain), or SIGKILL (a crash).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from stream_app.config import Settings, settings_environment
from stream_app.errors import ConfigError
from training.ops.services.net import LOOPBACK, free_port

READY: tuple[str, float] = ("fraudstream_ready", 1.0)
_POLL_S = 0.2
_LOG_TAIL_CHARS = 6000


def scrape_samples(url: str, timeout_s: float = 2.0) -> list[Sample] | None:
    """Every sample of a Prometheus endpoint, as the client library parses them (None when
    it is down)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scrape_metrics(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """Every sample of a Prometheus endpoint, ``name{labels}`` -> value ({} when down).

    Labels are sorted by name, so a sample's key is stable:
    ``fraudstream_events_total{outcome="scored"}``.
    """
    samples: dict[str, float] = {}
    for sample in scrape_samples(url, timeout_s) or ():
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
        samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def worker_command(source: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line of ``fraudstream worker`` and the variables it needs on top of the
    environment.

    Args:
        source: Run the ``stream_app`` of this source tree (e.g. a git worktree of another
            commit) instead of the installed one: it goes first on ``PYTHONPATH``, and ``-P``
            keeps the working directory's own ``stream_app`` off the path.
    """
    if source is None:
        return [sys.executable, "-m", "stream_app.cli", "worker"], {}
    path = os.pathsep.join([str(source.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])
    return [sys.executable, "-P", "-m", "stream_app.cli", "worker"], {"PYTHONPATH": path}


def worker_environment(
    settings: Settings, metrics_port: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment without its ``FRAUDSTREAM_*`` variables, then the
    worker's settings, its metrics port and ``extra``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")},
        **settings_environment(settings),
        "FRAUDSTREAM_METRICS_PORT": str(metrics_port),
        **(extra or {}),
    }


class WorkerProcess:
    """One ``fraudstream worker`` subprocess, its log in ``log_path``.

    Args:
        settings: The worker's settings (its metrics port is replaced by ``metrics_port``).
        log_path: Where its output goes (appended).
        command: Another worker's command line (e.g. a fresh virtual environment's
            ``fraudstream worker``); default :func:`worker_command`.
        cwd: Its working directory.
        env: Variables on top of :func:`worker_environment`.
        metrics_port: Where it serves its metrics; default a free port.
        new_session: Its own process session: a Ctrl-C on the terminal reaches the owner
            only, which stops the worker in order.

    Raises:
        ConfigError: from :meth:`start` and :meth:`wait_until`: it exited, or did not get
            there in time; the message holds the end of its log.
    """

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        new_session: bool = False,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = list(command) if command is not None else worker_command()[0]
        self.cwd = cwd
        self.extra_env = dict(env or {})
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.new_session = new_session
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        """Where the worker serves its metrics."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def spawn(self) -> WorkerProcess:
        """Start the process, without waiting for anything."""
        env = worker_environment(self.settings, self.metrics_port, self.extra_env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        return self

    def start(self, timeout_s: float = 90.0, until: tuple[str, float] = READY) -> WorkerProcess:
        """Start the worker and wait until it is ready to score (or, with ``until``, until
        another metric has a value: e.g. a worker held not ready). On failure the process
        is killed: the caller's ``with`` has not begun, nothing else would stop it."""
        self.spawn()
        try:
            self.wait_until(*until, timeout_s=timeout_s)
        except ConfigError:
            self.kill()
            raise
        return self

    def wait_until(self, name: str, value: float, timeout_s: float) -> None:
        """Until metric ``name`` equals ``value``; raises if the worker exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if self.metric(name) == value:
                return
            time.sleep(_POLL_S)
        raise ConfigError(f"the worker was not {name}={value} in {timeout_s:.0f} s:\n{self.log()}")

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        """Raise with the end of its log if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ConfigError(
                f"the worker exited with code {self.process.returncode}:\n{self.log()}"
            )

    def log(self) -> str:
        """The end of the worker's output so far."""
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def scrape(self) -> dict[str, float]:
        """Every sample of its metrics endpoint (see :func:`scrape_metrics`)."""
        return scrape_metrics(self.metrics_url)

    def metric(self, name: str) -> float | None:
        """One sample's value, None when absent or the endpoint is down."""
        return self.scrape().get(name)

    def wait_for(self, name: str, at_least: float, timeout_s: float = 60.0) -> None:
        """Wait until a metric reaches ``at_least``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.metric(name)
            if value is not None and value >= at_least:
                return
            time.sleep(_POLL_S)
        raise TimeoutError(f"{name} stayed below {at_least}:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.process is not None, "not started"
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit within ``grace_s``."""
        if self.running():
            try:
                self.terminate(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
