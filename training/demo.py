"""``fraudstream demo``: the whole system on one machine, with a live view and a verdict.

On a machine with no Kafka and no configuration it:

1. starts the bundled Kafka-protocol broker, or Apache Kafka with ``--broker kafka``
   (exactly-once, as deployed) (unless ``KAFKA_BOOTSTRAP_SERVERS`` or
   ``FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS`` is set), and uses ``REDIS_URL`` /
   ``FRAUDSTREAM_REDIS_URL`` or else a private ``redis-server`` on a free port;
2. checks the model (default ``onnx_models/default``; if missing, says to train one);
3. simulates a few thousand labelled transactions and replays them, with each fraud's
   label published a day after it, into demo-only topics;
4. runs ``fraudstream worker`` as a subprocess and shows events/s, end-to-end latency
   (p50, p99, from the worker's own histogram on its metrics endpoint) and the latest
   alerts with their reasons;
5. ends with the alerts' precision and recall against the simulator's labels.

Everything it starts it stops; the Redis keys it wrote under its own prefix are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import redis
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from stream_app import kafka_config
from stream_app.config import Settings, load_settings, settings_environment
from stream_app.errors import ConfigError, ModelError
from stream_app.records import Decision, ScoreRecord
from stream_app.scoring import OnnxScorer
from training.replay import ReplayStats, replay, replay_messages
from training.services.brokers import BrokerKind, deployed_settings, describe, local_broker
from training.services.net import LOOPBACK, free_port, wait_for_port
from training.simulator import SimulatorConfig, simulate

_WORKER_READY_TIMEOUT_S: Final = 120.0
_DRAIN_TIMEOUT_S: Final = 60.0  # after the replay, how long scores may take to come in
_REFRESH_S: Final = 0.5
_LATENCY_WINDOW_S: Final = 10.0  # latency quantiles over the last seconds
_RECENT_ALERTS: Final = 8


@dataclass(frozen=True)
class DemoOptions:
    """What ``fraudstream demo`` was asked for."""

    events: int | None = None
    duration_s: float | None = None
    rate: float = 400.0
    model_dir: Path | None = None
    labels_delay: timedelta = timedelta(days=1)
    seed: int = 42
    n_customers: int = 300
    n_days: int = 30
    keep_running: bool = False
    broker: BrokerKind = "bundled"


def demo_transactions(options: DemoOptions) -> pd.DataFrame:
    """A small labelled dataset: the Handbook's densities, fewer customers and days."""
    return simulate(
        SimulatorConfig(
            n_customers=options.n_customers,
            n_terminals=options.n_customers * 2,
            n_days=options.n_days,
            seed=options.seed,
        )
    )


_LOCAL_REDIS_URL: Final = f"redis://{LOOPBACK}:6379/0"


def _answers(url: str) -> bool:
    with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url, socket_timeout=1) as c:
        return bool(c.ping())
    return False


@contextlib.contextmanager
def local_redis(log_dir: Path) -> Iterator[str]:
    """A throw-away ``redis-server`` on a free loopback port (no persistence).

    Without the ``redis-server`` command, a Redis already listening on the default local
    port is used instead (the demo's keys are deleted afterwards).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        if _answers(_LOCAL_REDIS_URL):
            yield _LOCAL_REDIS_URL
            return
        raise ConfigError(
            "the demo needs Redis: set REDIS_URL (e.g. redis://127.0.0.1:6379/0) or install "
            "redis-server"
        )
    port = free_port()
    with (log_dir / "redis.log").open("ab") as log:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        if not wait_for_port(LOOPBACK, port, 10.0):
            raise ConfigError(f"redis-server did not start on port {port}")
        yield f"redis://{LOOPBACK}:{port}/0"
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _check_model(directory: Path) -> str:
    if not directory.exists():
        raise ConfigError(
            f"no model at {directory}: train one first (fraudstream train, which writes "
            "onnx_models/default) or pass --model-dir"
        )
    try:
        return OnnxScorer(directory).version
    except ModelError as exc:
        raise ConfigError(f"the model at {directory} cannot serve: {exc}") from None


@dataclass
class Observed:
    """What the demo has seen of the worker's output so far."""

    scores: dict[str, ScoreRecord] = field(default_factory=dict)
    recent_alerts: deque[ScoreRecord] = field(default_factory=lambda: deque(maxlen=_RECENT_ALERTS))
    events_per_s: float = 0.0
    latency_p50_s: float = float("nan")
    latency_p99_s: float = float("nan")
    replay: ReplayStats = field(default_factory=ReplayStats)
    # Kafka timestamps (the worker's produce time, ms) of the first and last score seen.
    first_score_ms: int | None = None
    last_score_ms: int | None = None
    # (time, cumulative bucket counts) samples of the latency histogram
    _latency_samples: deque[tuple[float, dict[float, float]]] = field(default_factory=deque)
    _events_samples: deque[tuple[float, float]] = field(default_factory=deque)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' ``histogram_quantile``: linear within the bucket holding quantile ``q``.

    >>> histogram_quantile(0.5, {0.01: 50.0, 0.02: 100.0, float("inf"): 100.0})
    0.01
    """
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


def _scrape(url: str) -> tuple[float, dict[float, float]] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    events = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "fraudstream_events":
            events = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name == "fraudstream_end_to_end_latency_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
    return events, buckets


def _update_rates(observed: Observed, scraped: tuple[float, dict[float, float]]) -> None:
    now = time.monotonic()
    events, buckets = scraped
    observed._events_samples.append((now, events))
    observed._latency_samples.append((now, buckets))
    while observed._events_samples and now - observed._events_samples[0][0] > _LATENCY_WINDOW_S:
        observed._events_samples.popleft()
    while observed._latency_samples and now - observed._latency_samples[0][0] > _LATENCY_WINDOW_S:
        observed._latency_samples.popleft()
    (t0, e0), (t1, e1) = observed._events_samples[0], observed._events_samples[-1]
    observed.events_per_s = (e1 - e0) / (t1 - t0) if t1 > t0 else 0.0
    first = observed._latency_samples[0][1]
    window = {le: count - first.get(le, 0.0) for le, count in buckets.items()}
    if window and max(window.values()) > 0:
        observed.latency_p50_s = histogram_quantile(0.5, window)
        observed.latency_p99_s = histogram_quantile(0.99, window)


def _view(observed: Observed, total: int, metrics_url: str) -> Group:
    stats = Table.grid(padding=(0, 3))
    stats.add_row(
        f"replayed [bold]{observed.replay.transactions:,}[/] / {total:,}",
        f"scored [bold]{len(observed.scores):,}[/]",
        f"[bold]{observed.events_per_s:,.0f}[/] events/s",
        f"latency p50 [bold]{observed.latency_p50_s * 1000:.1f}[/] ms",
        f"p99 [bold]{observed.latency_p99_s * 1000:.1f}[/] ms",
    )
    alerts = Table(expand=True, show_lines=False)
    alerts.add_column("transaction", no_wrap=True)
    alerts.add_column("score", justify="right")
    alerts.add_column("decision")
    alerts.add_column("reasons")
    for record in reversed(observed.recent_alerts):
        colour = "red" if record.decision is Decision.DECLINE else "yellow"
        alerts.add_row(
            escape(record.transaction_id),
            f"{record.score:.3f}",
            f"[{colour}]{record.decision.value}[/]",
            escape("; ".join(record.reasons)),
        )
    return Group(
        Panel(stats, title="fraudstream demo", subtitle=escape(metrics_url)),
        Panel(alerts, title="latest alerts"),
    )


@dataclass(frozen=True)
class DemoSummary:
    """Alerts against the simulator's labels."""

    scored: int
    frauds: int
    alerts: int
    true_alerts: int
    declines: int
    true_declines: int

    @property
    def precision(self) -> float:
        """Share of alerts that were frauds."""
        return self.true_alerts / self.alerts if self.alerts else 0.0

    @property
    def recall(self) -> float:
        """Share of frauds that were alerted."""
        return self.true_alerts / self.frauds if self.frauds else 0.0


def summarise(frame: pd.DataFrame, scores: dict[str, ScoreRecord]) -> DemoSummary:
    """Precision and recall of the alerts among the scored transactions."""
    labels = dict(
        zip(frame["TRANSACTION_ID"].astype(str), frame["TX_FRAUD"].astype(bool), strict=True)
    )
    fraud = np.array([labels[tx] for tx in scores], dtype=bool)
    decisions = [record.decision for record in scores.values()]
    alert = np.array([d is not Decision.APPROVE for d in decisions], dtype=bool)
    decline = np.array([d is Decision.DECLINE for d in decisions], dtype=bool)
    return DemoSummary(
        scored=len(scores),
        frauds=int(fraud.sum()),
        alerts=int(alert.sum()),
        true_alerts=int((alert & fraud).sum()),
        declines=int(decline.sum()),
        true_declines=int((decline & fraud).sum()),
    )


def summary_table(summary: DemoSummary, version: str) -> Table:
    """The closing table."""
    table = Table(title=f"Alerts against the known labels (model {escape(version)})")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    table.add_row("transactions scored", f"{summary.scored:,}")
    table.add_row("frauds among them", f"{summary.frauds:,}")
    table.add_row("alerts (review + decline)", f"{summary.alerts:,}")
    table.add_row("alerts that were fraud", f"{summary.true_alerts:,}")
    table.add_row("precision of alerts", f"{summary.precision:.1%}")
    table.add_row("recall of alerts", f"{summary.recall:.1%}")
    declines = summary.true_declines / summary.declines if summary.declines else 0.0
    table.add_row("precision of declines", f"{declines:.1%} of {summary.declines:,}")
    return table


async def _watch_scores(settings: Settings, observed: Observed, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(
        settings.topic_scores,
        **kafka_config.client_kwargs(settings),
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for message in records:
                    if observed.first_score_ms is None:
                        observed.first_score_ms = message.timestamp
                    observed.last_score_ms = max(observed.last_score_ms or 0, message.timestamp)
                    record = ScoreRecord.from_json(message.value)
                    observed.scores[record.transaction_id] = record
                    if record.decision is not Decision.APPROVE:
                        observed.recent_alerts.append(record)
    finally:
        await consumer.stop()


def _start_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings_environment(settings)}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + _WORKER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ConfigError(f"the worker exited with code {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if b"fraudstream_ready 1.0" in response.read():
                return
        await asyncio.sleep(0.5)
    raise ConfigError(f"the worker was not ready within {_WORKER_READY_TIMEOUT_S:.0f} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _delete_keys(url: str, prefix: str) -> None:
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        finally:
            client.close()


async def _run(
    options: DemoOptions, settings: Settings, version: str, console: Console, work: Path
) -> DemoSummary:
    frame = demo_transactions(options)
    total = len(frame) if options.events is None else min(options.events, len(frame))
    observed = Observed()
    metrics_url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    log_path = work / "worker.log"
    console.print(f"starting the worker (log: {escape(str(log_path))}) ...")
    process = _start_worker(settings, log_path)
    stop_watching = asyncio.Event()
    try:
        await _wait_ready(process, metrics_url, log_path)
        watcher = asyncio.create_task(_watch_scores(settings, observed, stop_watching))
        stop_replay = asyncio.Event()

        def progress(stats: ReplayStats) -> None:
            observed.replay = stats

        messages = replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            labels_delay=options.labels_delay,
            limit=total,
        )
        replaying = asyncio.create_task(
            replay(messages, settings, rate=options.rate, on_progress=progress, stop=stop_replay)
        )
        started = time.monotonic()
        drain_deadline: float | None = None
        with Live(
            _view(observed, total, metrics_url), console=console, refresh_per_second=4
        ) as live:
            while True:
                await asyncio.sleep(_REFRESH_S)
                scraped = await asyncio.to_thread(_scrape, metrics_url)
                if scraped is not None:
                    _update_rates(observed, scraped)
                live.update(_view(observed, total, metrics_url))
                elapsed = time.monotonic() - started
                if options.duration_s is not None and elapsed > options.duration_s:
                    stop_replay.set()
                if replaying.done():
                    replaying.result()  # surface a replay error
                    drain_deadline = drain_deadline or time.monotonic() + _DRAIN_TIMEOUT_S
                    if len(observed.scores) >= observed.replay.transactions:
                        break
                    if time.monotonic() > drain_deadline:
                        console.print("[yellow]not every replayed event was scored in time[/]")
                        break
                if watcher.done():
                    watcher.result()
        stop_watching.set()
        await watcher
        summary = summarise(frame, observed.scores)
        console.print(summary_table(summary, version))
        console.print(
            f"{observed.replay.transactions:,} transactions replayed in "
            f"{observed.replay.seconds:.1f} s; worker metrics: {escape(metrics_url)}"
        )
        if observed.first_score_ms is not None and observed.last_score_ms is not None:
            span_s = max((observed.last_score_ms - observed.first_score_ms) / 1000, 1e-3)
            console.print(
                f"worker throughput: {len(observed.scores):,} scores in {span_s:.1f} s "
                f"({len(observed.scores) / span_s:,.0f} events/s, replay rate "
                f"{'unlimited' if not options.rate else f'{options.rate:,.0f}/s'})"
            )
        if options.keep_running:
            console.print("the worker keeps running; press Ctrl-C to stop")
            with contextlib.suppress(asyncio.CancelledError):
                while process.poll() is None:
                    await asyncio.sleep(1)
        return summary
    finally:
        stop_watching.set()
        _stop(process)


def run_demo(options: DemoOptions, console: Console | None = None) -> DemoSummary:
    """Run the demo end to end; returns the summary it printed.

    Raises:
        ConfigError: no model, no Redis, or a service did not start; the message says
            what to do.
    """
    console = console or Console()
    base = load_settings()
    model_dir = options.model_dir or base.model_dir
    version = _check_model(model_dir)
    run_id = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fraudstream-demo-")))
        overrides: dict[str, Any] = {
            "model_dir": model_dir,
            "group_id": f"demo-{run_id}",
            "state_key_prefix": f"demo-{run_id}",
            "topic_transactions": f"demo-{run_id}.transactions",
            "topic_labels": f"demo-{run_id}.labels",
            "topic_scores": f"demo-{run_id}.scores",
            "topic_alerts": f"demo-{run_id}.alerts",
            "topic_shadow_scores": f"demo-{run_id}.scores.shadow",
            "topic_dead_letters": f"demo-{run_id}.transactions.dlq",
            "topic_label_dead_letters": f"demo-{run_id}.labels.dlq",
            "instance_id": f"demo-{run_id}",
            "metrics_host": LOOPBACK,
            "consumer_session_timeout_s": 6.0,
        }
        if "metrics_port" not in base.model_fields_set:
            overrides["metrics_port"] = free_port()
        if "kafka_bootstrap_servers" not in base.model_fields_set:
            console.print(f"starting {describe(options.broker)} ...")
            overrides["kafka_bootstrap_servers"] = stack.enter_context(
                local_broker(options.broker, work)
            )
            # Exactly-once with the idempotent producer on Apache Kafka, as deployed; the
            # bundled broker supports neither.
            overrides.update(deployed_settings(options.broker))
            console.print(
                f"started {describe(options.broker)} on {overrides['kafka_bootstrap_servers']}"
            )
        if "redis_url" not in base.model_fields_set:
            overrides["redis_url"] = stack.enter_context(local_redis(work))
            console.print(f"using a local redis-server on {overrides['redis_url']}")
        settings = load_settings(**overrides)
        console.print(f"model {escape(version)} from {escape(str(model_dir))}")
        console.print(f"processing guarantee: {settings.processing_guarantee}")
        try:
            return asyncio.run(_run(options, settings, version, console, work))
        finally:
            _delete_keys(settings.redis_url.get_secret_value(), settings.state_key_prefix)
