"""``fraudstream bench``: one worker's end-to-end throughput and latency, and two references.

What one run measures, on its own bundled broker and the configured Redis::

    1. publish warm-up + N events (a backlog)  ──► limit reference (aiokafka + ONNX per batch)
                                               ──► worker(s): events/s over the N events
    2. a backlog of C events on topics of      ──► cold drain: worker(s) started on it, timed
       its own, no worker running                  from process spawn to the last score record
    3. paced replay at each offered load,      ──► a fresh worker: latency p50/p95/p99, CPU
       on topics of its own, same Redis state      (event creation -> score record consumed)
    4. the backlog again                       ──► naive reference (Faust, per-event I/O)

The warm-up is long enough for the state to reach its steady size: the customer windows
look back 30 days, so a customer's retained history grows for the first 30 days of a stream
(on the default data from ~8 entries per event on day 1 to ~86 from day 31 on) and the
state script and the features cost more per event as it grows. The default warm-up
(:data:`~training.ops.bench_commands.WARMUP_EVENTS`) is 31 days of the default data; with a
shorter one the throughput is measured on days that are cheaper than any a running
deployment sees, and the cold drain (later days, full histories) looks slower than the
steady rate for that reason alone.

Throughput is the slope of the ``scored`` counter(s) between the warm-up count and the
warm-up + N count, sampled every 0.25 s; CPU is ``/proc/<pid>/stat`` over the same window
(in cores), as for Redis (``INFO cpu``) and the broker; peak RSS is ``VmHWM``. The cold
drain is what a user sees after an outage: start-up included, its times come from the score
records' own timestamps (see :func:`score_record_times`). ``--soak``
instead replays at a fixed rate for minutes and records RSS and Redis ``used_memory`` over
time. :mod:`training.ops.bench_references` holds the two references; the command and its table
are in :mod:`training.ops.bench_commands`.

Everything runs on loopback, with a broker, topics, consumer groups and a Redis key prefix
of the run's own (its keys are deleted at the end); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream_app import features
from stream_app.config import Settings, load_settings, redact_url
from stream_app.errors import ConfigError
from stream_app.kafka import config as kafka_config
from stream_app.kafka.config import ensure_topics
from stream_app.worker.membership import parse_assigned
from training.ops.bench_commands import WARMUP_EVENTS
from training.ops.replay import ReplayMessage, ensure_input_topics, replay, replay_messages
from training.ops.services.brokers import BrokerKind, deployed_settings, describe, local_broker
from training.ops.services.net import free_port
from training.ops.services.redis_cluster import LocalRedisCluster
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import (
    scrape_metrics,
    worker_command,
    worker_environment,
)

DEFAULT_DATA: Final = Path("data/tx.parquet")
DEFAULT_MODEL: Final = Path("onnx_models/default")
SAMPLE_INTERVAL_S: Final = 0.25
LATENCY_WARMUP_S: Final = 2.0
_PACE_SLICE_S: Final = 0.005
# The bundled broker's CPU per fetch grows with the partition's size (2 ms at 5,000 records,
# 4 ms at 40,000): hundreds of short-wait fetches a second saturate it after a minute or
# so, and then every fetch times out empty (the worker stalls, training/reports/PROFILE.md).
# A soak therefore fetches at most ~10 times a second per consumer.
_SOAK_SLICE_S: Final = 0.05
_SOAK_FETCH_WAIT_MS: Final = 100
_SOAK_PROBE_WAIT_MS: Final = 100
# The latency consumer's fetch wait: the bundled broker holds a fetch this long even when
# data is there (Kafka answers at once), so it adds up to this much to every latency.
_PROBE_FETCH_WAIT_MS: Final = 2
_DRAIN_TIMEOUT_S: Final = 60.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_SCORED: Final = 'fraudstream_events_total{outcome="scored"}'


# --- processes ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_mib(pid: int, field_name: str = "VmHWM") -> float:
    """A memory figure of ``/proc/<pid>/status`` (VmHWM: peak RSS; VmRSS: now), in MiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def child_pids(name_part: str) -> list[int]:
    """Children of this process whose command name contains ``name_part`` (the broker)."""
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                if name_part in Path(f"/proc/{pid}/comm").read_text():
                    pids.append(int(pid))
    return pids


class Subject:
    """A measured process: a worker (counts from its metrics) or a reference (from a file).

    Args:
        name: How the tables call it.
        command: The command line.
        env: Its environment.
        log_path: Where its output goes.
        metrics_port: The worker's metrics port, or None for a reference.
        progress_path: The file a reference writes its count to, or None for a worker.
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        metrics_port: int | None = None,
        progress_path: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.metrics_port = metrics_port
        self.progress_path = progress_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def metrics(self) -> dict[str, float]:
        """The worker's metric samples (empty for a reference or while it is down)."""
        if self.metrics_port is None:
            return {}
        return scrape_metrics(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def count(self) -> int:
        """Events processed so far."""
        if self.progress_path is not None:
            with contextlib.suppress(OSError, ValueError):
                return int(json.loads(self.progress_path.read_text())["events"])
            return 0
        return int(self.metrics().get(_SCORED, 0))

    def ready(self) -> bool:
        """Whether it consumes: a worker's ``fraudstream_ready`` gauge, a reference's file."""
        if self.progress_path is not None:
            with contextlib.suppress(OSError, ValueError):
                return bool(json.loads(self.progress_path.read_text()).get("ready"))
            return False
        return self.metrics().get("fraudstream_ready") == 1.0

    def check_alive(self) -> None:
        """Raise with the end of its log if the process has exited."""
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise ConfigError(f"{self.name} exited with code {self.process.returncode}:\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)


def check_worker_src(source: Path) -> Path:
    """The ``stream_app`` package a worker run from ``source`` imports, checked to be there.

    Raises:
        ConfigError: it would import another copy (or none): the comparison would be void.
    """
    command, extra = worker_command(source)
    code = "import stream_app.cli, stream_app; print(stream_app.__file__)"
    probe = [command[0], "-P", "-c", code]
    done = subprocess.run(
        probe, env={**os.environ, **extra}, capture_output=True, text=True, timeout=120
    )
    package = Path(done.stdout.strip() or ".").resolve().parent
    if done.returncode != 0 or not package.is_relative_to(source.resolve()):
        raise ConfigError(
            f"--worker-src {source}: the worker would import {package} "
            f"(exit code {done.returncode}){': ' + done.stderr[-500:] if done.stderr else ''}"
        )
    return package


def start_worker(
    settings: Settings, log_path: Path, name: str = "worker", source: Path | None = None
) -> Subject:
    """``fraudstream worker`` as a subprocess with these settings, metrics on a free port
    (``source``: see :func:`worker_command`)."""
    port = free_port()
    command, extra = worker_command(source)
    env = worker_environment(settings, port, {**extra, "FRAUDSTREAM_LOG_LEVEL": "INFO"})
    return Subject(name, command, env, log_path, metrics_port=port)


async def wait_ready(subjects: Sequence[Subject], timeout_s: float = 120.0) -> None:
    """Until every worker's metrics endpoint answers (a reference: until it is running)."""
    deadline = time.monotonic() + timeout_s
    for subject in subjects:
        while subject.metrics_port is not None and not subject.metrics():
            subject.check_alive()
            if time.monotonic() > deadline:
                raise ConfigError(f"{subject.name} did not start in {timeout_s:g} s")
            await asyncio.sleep(0.2)


async def wait_scoring(worker: Subject, timeout_s: float = 120.0) -> None:
    """Until the worker's scoring consumer has its partitions (``fraudstream_ready`` 1), or
    a reference says it consumes."""
    deadline = time.monotonic() + timeout_s
    while not worker.ready():
        worker.check_alive()
        if time.monotonic() > deadline:
            raise ConfigError(f"{worker.name} got no partitions in {timeout_s:g} s")
        await asyncio.sleep(0.25)


# --- sampling -------------------------------------------------------------------------

CpuProbe = Callable[[], float]
"""CPU seconds used so far by something (a process, Redis)."""


@dataclass(frozen=True)
class Sample:
    """Combined count of the measured processes, and each probe's CPU time, at one moment."""

    t: float
    count: int
    cpu_s: tuple[float, ...]


@dataclass(frozen=True)
class Window:
    """What happened between two counts; ``cpu_cores`` in the probes' order."""

    events: int
    seconds: float
    cpu_cores: tuple[float, ...]

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


def process_probe(subjects: Sequence[Subject]) -> CpuProbe:
    """The combined CPU time of processes."""
    return lambda: sum(cpu_seconds(s.pid) for s in subjects)


def redis_node_urls(settings: Settings) -> list[str]:
    """URLs of every Redis server holding the state: one, or every node of a cluster
    (primaries and replicas: a replica spends CPU applying what it is sent)."""
    url = settings.redis_url.get_secret_value()
    if not settings.redis_cluster:
        return [url]
    import redis

    # Every node's address, as the node the URL names sees the cluster.
    client: Any = redis.Redis.from_url(url)  # execute_command is untyped in redis-py
    try:
        nodes: dict[str, Any] = client.execute_command("CLUSTER NODES")
    finally:
        client.close()
    return [f"redis://{address.split('@')[0]}/0" for address in nodes]


def redis_probe(settings: Settings) -> CpuProbe:
    """Redis's CPU time (``INFO cpu``), summed over the servers holding the state."""
    import redis

    clients = [redis.Redis.from_url(url) for url in redis_node_urls(settings)]

    def probe() -> float:
        total = 0.0
        for client in clients:
            info = client.info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return total

    return probe


def take_sample(subjects: Sequence[Subject], probes: Sequence[CpuProbe]) -> Sample:
    """Count of every subject and every probe's CPU, now."""
    return Sample(
        time.monotonic(), sum(s.count() for s in subjects), tuple(probe() for probe in probes)
    )


async def sample_until(
    subjects: Sequence[Subject],
    done: Callable[[Sample], bool],
    timeout_s: float,
    probes: Sequence[CpuProbe] = (),
) -> list[Sample]:
    """Sample every :data:`SAMPLE_INTERVAL_S` until ``done(latest)`` or the timeout.

    The first probe is always the subjects' own CPU time.
    """
    probes = [process_probe(subjects), *probes]
    samples = [await asyncio.to_thread(take_sample, subjects, probes)]
    deadline = time.monotonic() + timeout_s
    while not done(samples[-1]) and time.monotonic() < deadline:
        for s in subjects:
            s.check_alive()
        await asyncio.sleep(SAMPLE_INTERVAL_S)
        samples.append(await asyncio.to_thread(take_sample, subjects, probes))
    return samples


def _crossing(samples: Sequence[Sample], count: int) -> tuple[float, tuple[float, ...]] | None:
    """Time and CPU at which the count reached ``count``, interpolated between samples."""
    if not samples or samples[-1].count < count:
        return None
    if samples[0].count >= count:
        return samples[0].t, samples[0].cpu_s
    for before, after in itertools.pairwise(samples):
        if after.count >= count:  # counts never decrease: before.count < count here
            share = (count - before.count) / (after.count - before.count)
            cpu = tuple(b + share * (a - b) for b, a in zip(before.cpu_s, after.cpu_s, strict=True))
            return before.t + share * (after.t - before.t), cpu
    return None  # pragma: no cover - unreachable, the last sample reached count


def window(samples: Sequence[Sample], start: int, end: int) -> Window | None:
    """The window between the counts ``start`` and ``end``; None if ``end`` was not reached.

    >>> samples = [Sample(0.0, 0, (0.0,)), Sample(1.0, 100, (0.5,)), Sample(2.0, 300, (1.5,))]
    >>> w = window(samples, 100, 200)
    >>> (w.events, w.seconds, w.cpu_cores)
    (100, 0.5, (1.0,))
    """
    a, b = _crossing(samples, start), _crossing(samples, end)
    if a is None or b is None or b[0] <= a[0]:
        return None
    seconds = b[0] - a[0]
    cores = tuple((after - before) / seconds for before, after in zip(a[1], b[1], strict=True))
    return Window(end - start, seconds, cores)


# --- results --------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """One path's sustained rate over a window of events."""

    name: str
    events: int
    seconds: float
    events_per_s: float
    cpu_cores: float
    peak_rss_mib: float
    redis_cpu_cores: float
    broker_cpu_cores: float


@dataclass(frozen=True)
class ColdDrain:
    """Worker(s) started on a backlog, from process spawn to the last score record.

    Times are the score records' timestamps (set by the worker's producer when it builds
    each batch) against the wall clock at spawn; CPU is from spawn (start-up included) to
    the moment the ``scored`` counter reached ``events``.
    """

    events: int
    startup_s: float  # spawn -> first score record
    seconds: float  # spawn -> last score record
    events_per_s: float  # events / seconds: what a user waits for
    scoring_events_per_s: float  # events / (last - first score record)
    worker_cpu_s: float
    redis_cpu_s: float
    broker_cpu_s: float
    peak_rss_mib: float

    def us_per_event(self, cpu_s: float) -> float:
        """CPU seconds over the drain as microseconds per event.

        >>> ColdDrain(1000, 1.0, 2.0, 500.0, 1000.0, 0.05, 0.0, 0.0, 0.0).us_per_event(0.05)
        50.0
        """
        return cpu_s / self.events * 1e6 if self.events else float("nan")


@dataclass(frozen=True)
class Latency:
    """End-to-end latency at one offered load."""

    offered_per_s: float
    achieved_per_s: float
    events: int
    received: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    worker_cpu_cores: float
    load_average: float


@dataclass
class BenchResult:
    """Everything one bench run measured (the JSON file)."""

    started_at: str
    machine: dict[str, Any]
    model_version: str
    data: str
    settings: dict[str, Any]
    worker: Throughput | None = None
    workers: int = 1
    partition_split: dict[str, list[str]] = field(default_factory=dict)
    naive: Throughput | None = None
    limit: Throughput | None = None
    cold: ColdDrain | None = None
    latencies: list[Latency] = field(default_factory=list)
    floor_latencies: list[Latency] = field(default_factory=list)
    redis: dict[str, float] = field(default_factory=dict)
    load_average: dict[str, float] = field(default_factory=dict)
    soak: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BenchResult:
        """Read back what :meth:`to_json` wrote (to re-render a table)."""
        data = json.loads(text)
        for name in ("worker", "naive", "limit"):
            if data.get(name) is not None:
                data[name] = Throughput(**data[name])
        if data.get("cold") is not None:
            data["cold"] = ColdDrain(**data["cold"])
        for name in ("latencies", "floor_latencies"):
            data[name] = [Latency(**x) for x in data.get(name, [])]
        return cls(**data)


def percentiles_ms(latencies_s: Sequence[float]) -> tuple[float, float, float, float]:
    """p50, p95, p99 and max of latencies in seconds, in milliseconds (NaN when empty)."""
    if not latencies_s:
        return (float("nan"),) * 4
    values = np.asarray(latencies_s, dtype=np.float64) * 1000
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return float(p50), float(p95), float(p99), float(values.max())


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, kernel and library versions of this machine."""
    import aiokafka
    import onnxruntime

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "aiokafka": aiokafka.__version__,
    }


# --- events ---------------------------------------------------------------------------


def take_transactions(messages: Iterator[ReplayMessage], n: int) -> list[ReplayMessage]:
    """The next messages up to and including the ``n``-th transaction (labels ride along)."""
    out: list[ReplayMessage] = []
    taken = 0
    while taken < n:
        message = next(messages, None)
        if message is None:
            break
        out.append(message)
        taken += not message.is_label
    return out


def event_stream(settings: Settings, data: Path | None, needed: int) -> Iterator[ReplayMessage]:
    """The dataset's first ``needed`` transactions in event-time order, with fraud labels a
    label delay later (``data/tx.parquet`` by default, else a fresh simulation).

    Raises:
        ConfigError: the file holds fewer transactions than needed.
    """
    from training.transactions import read_transactions

    path = data if data is not None else DEFAULT_DATA
    if path.is_file():
        frame = read_transactions(path)
    else:
        from training.simulator import SimulatorConfig, simulate

        # The default population makes ~9,500 transactions a day.
        frame = simulate(SimulatorConfig(n_days=needed // 9000 + 2))
    if len(frame) < needed:
        raise ConfigError(f"{path} holds {len(frame):,} transactions, the bench needs {needed:,}")
    return replay_messages(
        frame,
        transactions_topic=settings.topic_transactions,
        labels_topic=settings.topic_labels,
        labels_delay=timedelta(days=features.LABEL_DELAY_DAYS),
        limit=needed,
    )


# --- offered load ---------------------------------------------------------------------


async def _score_consumer(
    settings: Settings, fetch_wait_ms: int, *, at_end: bool = True
) -> AIOKafkaConsumer:
    """A consumer of every scores partition, positioned at the end (or the beginning)."""
    consumer = AIOKafkaConsumer(
        **kafka_config.client_kwargs(settings),
        group_id=None,
        fetch_max_wait_ms=fetch_wait_ms,
        max_poll_records=10_000,
        # Under exactly-once a record counts once its transaction commits: what a
        # downstream reader sees, so the latency includes the commit.
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
    )
    await consumer.start()
    partitions = [
        TopicPartition(settings.topic_scores, p) for p in range(settings.topic_partitions)
    ]
    consumer.assign(partitions)
    await (consumer.seek_to_end if at_end else consumer.seek_to_beginning)(*partitions)
    for tp in partitions:  # resolve the positions now, before anything is produced
        await consumer.position(tp)
    return consumer


async def offered_load(
    settings: Settings,
    messages: Iterator[ReplayMessage],
    *,
    rate: float,
    transactions: int,
    workers: Sequence[Subject],
    latencies: list[float] | None = None,
    slice_s: float = _PACE_SLICE_S,
    probe_wait_ms: int = _PROBE_FETCH_WAIT_MS,
    warmup_s: float = LATENCY_WARMUP_S,
) -> Latency:
    """Publish ``transactions`` at ``rate`` a second and time each one's score record.

    Latency runs from the moment an event is handed to the producer (also its record
    timestamp) to the moment a consumer of the scores topic holds its record. Events are
    sent in slices of ``slice_s``; acknowledgements are not awaited in between.

    Args:
        latencies: Filled with every latency (seconds) as it is measured (for the soak).
        slice_s: How much of the rate is sent at once.
        probe_wait_ms: The scores consumer's fetch wait (added to the latency measured).
        warmup_s: Events created in the first seconds are sent and scored at the same rate
            but not measured: each load runs on topics just created, whose partition
            leaders Apache Kafka may still be electing, with clients still connecting.
    """
    latencies = [] if latencies is None else latencies
    warm_until = time.time() + warmup_s  # events created before are not measured
    consumer = await _score_consumer(settings, probe_wait_ms)
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    sent: dict[str, float] = {}
    done_sending = asyncio.Event()

    async def receive() -> None:
        while sent or not done_sending.is_set():
            batch = await consumer.getmany(timeout_ms=50)
            now = time.time()
            for records in batch.values():
                for r in records:
                    created = sent.pop(orjson.loads(r.value)["transaction_id"], None)
                    if created is not None and created >= warm_until:
                        latencies.append(now - created)

    receiver = asyncio.create_task(receive())
    cpu_before = sum(cpu_seconds(w.pid) for w in workers)
    started = time.monotonic()
    count = 0
    try:
        acks: list[asyncio.Future[Any]] = []
        per_slice = max(1, round(rate * slice_s))
        while count < transactions:
            chunk = take_transactions(messages, min(per_slice, transactions - count))
            if not chunk:
                break  # the dataset ran out
            for message in chunk:
                created = time.time()
                if not message.is_label:
                    sent[orjson.loads(message.value)["transaction_id"]] = created
                    count += 1
                topic = settings.topic_labels if message.is_label else settings.topic_transactions
                acks.append(
                    await producer.send(
                        topic,
                        message.value,
                        key=message.key,
                        timestamp_ms=int(created * 1000),
                    )
                )
            if len(acks) >= 20_000:
                await asyncio.gather(*acks)
                acks.clear()
            ahead = count / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await asyncio.gather(*acks)
        seconds = time.monotonic() - started
        done_sending.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(receiver), _DRAIN_TIMEOUT_S)
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        await producer.stop()
        await consumer.stop()
    elapsed = time.monotonic() - started
    cpu = sum(cpu_seconds(w.pid) for w in workers) - cpu_before
    p50, p95, p99, worst = percentiles_ms(latencies)
    return Latency(
        offered_per_s=rate,
        achieved_per_s=round(count / seconds, 1),
        events=count,
        received=len(latencies),
        p50_ms=round(p50, 2),
        p95_ms=round(p95, 2),
        p99_ms=round(p99, 2),
        max_ms=round(worst, 2),
        worker_cpu_cores=round(cpu / elapsed, 3),
        load_average=round(os.getloadavg()[0], 2),
    )


async def score_record_times(
    settings: Settings, events: int, timeout_s: float = _DRAIN_TIMEOUT_S
) -> tuple[float, float, int]:
    """First and last timestamp (epoch seconds) of the scores topic's records, and how many
    transactions they score, read from the beginning until ``events`` are seen.

    The records' timestamps, not a scrape of the worker's metrics or its committed offsets:
    the worker's producer stamps each record when it builds the batch (or the broker when
    it appends, under ``LogAppendTime``), to the millisecond, whereas a metrics scrape
    adds its sampling interval and a commit its commit interval to the end of a drain.

    Raises:
        ConfigError: fewer than ``events`` scored transactions within the timeout.
    """
    consumer = await _score_consumer(settings, 100, at_end=False)
    seen: set[str] = set()
    first, last = float("inf"), 0.0
    deadline = time.monotonic() + timeout_s
    try:
        # To the end as it is now, not only to the ``events``-th transaction: a duplicate
        # (an at-least-once re-send) may be the last record.
        ends = await consumer.end_offsets(list(consumer.assignment()))

        async def at_end() -> bool:
            return all([await consumer.position(tp) >= end for tp, end in ends.items()])

        while time.monotonic() < deadline and not (len(seen) >= events and await at_end()):
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batch.values():
                for r in records:
                    seen.add(orjson.loads(r.value)["transaction_id"])
                    first, last = min(first, r.timestamp / 1000), max(last, r.timestamp / 1000)
    finally:
        await consumer.stop()
    if len(seen) < events:
        raise ConfigError(
            f"{settings.topic_scores} holds scores of {len(seen):,} transactions, not {events:,}"
        )
    return first, last, len(seen)


# --- Redis ----------------------------------------------------------------------------


async def redis_stats(settings: Settings) -> dict[str, float]:
    """Redis CPU seconds, memory, and the state scripts' calls and time so far, summed
    over the servers holding the state."""
    totals = dict.fromkeys(("cpu_s", "used_memory", "evalsha_calls", "evalsha_usec"), 0.0)
    for url in await asyncio.to_thread(redis_node_urls, settings):
        client = aioredis.Redis.from_url(url)
        try:
            info = await client.info("all")
        finally:
            await client.aclose()
        evalsha = info.get("cmdstat_evalsha", {})
        totals["cpu_s"] += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        totals["used_memory"] += float(info["used_memory"])
        totals["evalsha_calls"] += float(evalsha.get("calls", 0))
        totals["evalsha_usec"] += float(evalsha.get("usec", 0))
    return totals


async def delete_prefix(settings: Settings, prefix: str) -> None:
    """Delete every key under ``prefix:``."""
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


# --- the run --------------------------------------------------------------------------


# Events/s reserved for the measured maximum load (and the most it offers): above any one
# worker's rate here, and low enough for the default data to hold a whole run.
MAX_LOAD_RESERVED: Final = 20_000


@dataclass(frozen=True)
class BenchOptions:
    """What ``fraudstream bench`` measures (see its ``--help``)."""

    model_dir: Path = DEFAULT_MODEL
    data: Path | None = None
    events: int = 200_000
    warmup_events: int = WARMUP_EVENTS
    loads: tuple[float, ...] = (1_000.0, 2_000.0, 5_000.0)
    max_load: bool = True
    load_seconds: float = 15.0
    workers: int = 1
    references: bool = True
    cold_events: int = 300_000  # the cold drain's backlog; 0: no cold drain
    worker_src: Path | None = None  # run the worker from this source tree
    naive_seconds: float = 30.0
    partitions: int = 4
    soak_seconds: float = 0.0
    soak_rate: float = 2_000.0
    redis_url: str | None = None  # None: a redis-server of the run's own
    workdir: Path = Path("/tmp")
    broker: BrokerKind = "bundled"
    guarantee: str = "at_least_once"  # or exactly_once (Apache Kafka only)
    redis_cluster: bool = False  # a 3-primary, 3-replica Redis Cluster of the run's own
    latency: bool = True  # the offered loads after the throughput

    @property
    def needed(self) -> int:
        """Transactions the run may publish (the maximum load is reserved at
        :data:`MAX_LOAD_RESERVED`, the relay floor runs each load too)."""
        if self.soak_seconds:
            return int(self.soak_rate * self.soak_seconds)
        backlogs = self.warmup_events + self.events + self.cold_events
        if not self.latency:
            return backlogs
        paced = sum(self.loads) + (MAX_LOAD_RESERVED if self.max_load else 0)
        runs = 2 if self.references else 1  # the relay floor takes as many as the worker
        return backlogs + int(runs * paced * self.load_seconds)


@contextlib.contextmanager
def own_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of the run's own on a free loopback port (no persistence); its URL.

    Other clients of a shared Redis would queue our calls behind theirs (one thread) and
    blur its CPU figures: the bench measures on a server nothing else uses.
    """
    with RedisServer(workdir, durable=False) as server:
        yield server.url


def bench_settings(
    bootstrap: str, options: BenchOptions, tag: str, redis_url: str | None = None, phase: str = ""
) -> Settings:
    """Worker settings of one run: its own topics, group and Redis key prefix.

    Each ``phase`` gets topics and a consumer group of its own; the Redis state (and so
    the customers' histories) carries over from phase to phase. The producer is idempotent
    where the broker supports it (Apache Kafka), and the processing guarantee is the run's.

    Raises:
        ConfigError: exactly-once asked of the bundled broker, which has no transactions.
    """
    if options.guarantee == "exactly_once" and options.broker != "kafka":
        raise ConfigError("exactly_once needs Apache Kafka: run the bench with --broker kafka")
    names = ("transactions", "labels", "scores", "alerts", "shadow_scores", "dead_letters")
    extra: dict[str, Any] = {"redis_url": redis_url} if redis_url else {}
    if options.redis_cluster:
        extra["redis_cluster"] = True
    topics = f"bench-{tag}{phase}"
    return load_settings(
        **extra,
        kafka_bootstrap_servers=bootstrap,
        group_id=topics,
        instance_id="bench-0",
        **{**deployed_settings(options.broker), "processing_guarantee": options.guarantee},
        topic_partitions=options.partitions,
        state_key_prefix=f"bench-{tag}",
        model_dir=options.model_dir,
        topic_label_dead_letters=f"{topics}-label_dead_letters",
        **{f"topic_{name}": f"{topics}-{name}" for name in names},
    )


def partition_split(workers: Sequence[Subject]) -> dict[str, list[str]]:
    """Each worker's last logged partition assignment."""
    split: dict[str, list[str]] = {}
    for worker in workers:
        found = [
            names
            for line in worker.log_path.read_text(errors="replace").splitlines()
            if (names := parse_assigned(line)) is not None
        ]
        split[worker.name] = found[-1] if found else []
    return split


def _model_version(model_dir: Path) -> str:
    from stream_app.models.card import load_card
    from stream_app.models.registry import resolve_model_dir

    return load_card(resolve_model_dir(model_dir)).version


class BenchRun:
    """One bench run: a broker, topics, Redis prefix and processes of its own.

    Args:
        options: What to measure.
        say: Progress lines (the command prints them).
    """

    def __init__(self, options: BenchOptions, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.tag = uuid.uuid4().hex[:8]
        self.workdir = options.workdir / f"fraudstream-bench-{self.tag}"
        self.workdir.mkdir(parents=True)
        self.subjects: list[Subject] = []

    async def run(self) -> BenchResult:
        """Run every phase; stops its processes and deletes its Redis keys whatever happens."""
        o = self.options
        if o.worker_src is not None:
            package = await asyncio.to_thread(check_worker_src, o.worker_src)
            self.say(f"the worker runs {package}")
        with contextlib.ExitStack() as services:
            self.say(f"starting {describe(o.broker)}")
            bootstrap = services.enter_context(local_broker(o.broker, self.workdir))
            if o.redis_cluster:
                self.say("starting a Redis Cluster (3 primaries, 3 replicas)")
                cluster = LocalRedisCluster(self.workdir / "redis-cluster")
                redis_url = services.enter_context(cluster).url
            else:
                redis_url = o.redis_url or services.enter_context(own_redis(self.workdir))
            settings = bench_settings(bootstrap, o, self.tag, redis_url)
            result = BenchResult(
                started_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                machine=machine_info(),
                model_version=_model_version(o.model_dir),
                data=str(o.data or DEFAULT_DATA),
                settings={
                    "broker": o.broker,
                    "processing_guarantee": o.guarantee,
                    "redis": (
                        "own Redis Cluster, 3 primaries + 3 replicas"
                        if o.redis_cluster
                        else "shared " + redact_url(o.redis_url)
                        if o.redis_url
                        else "own"
                    ),
                    "partitions": o.partitions,
                    "batch_size": settings.batch_size,
                    "batch_max_wait_s": settings.batch_max_wait_s,
                    "warmup_events": o.warmup_events,
                    "events": o.events,
                    "cold_events": o.cold_events,
                    "workers": o.workers,
                    **({"worker_src": str(o.worker_src)} if o.worker_src else {}),
                },
                workers=o.workers,
                load_average={"before": round(os.getloadavg()[0], 2)},
            )
            stream = event_stream(settings, o.data, o.needed)
            try:
                if o.soak_seconds:
                    result.soak = await self._soak(settings, stream)
                else:
                    await self._throughput_and_latency(settings, stream, result)
            finally:
                for subject in self.subjects:
                    subject.stop()
                if not o.redis_cluster:  # a cluster is the run's own: it goes with its keys
                    for prefix in (settings.state_key_prefix, settings.state_key_prefix + "-naive"):
                        await delete_prefix(settings, prefix)
            result.load_average["after"] = round(os.getloadavg()[0], 2)
        return result

    def _worker(self, settings: Settings, index: int, role: str = "worker") -> Subject:
        instance = settings.model_copy(update={"instance_id": f"bench-{index}"})
        name = f"{role}-{index}"
        log_path = self.workdir / f"{name}.log"
        subject = start_worker(instance, log_path, name, self.options.worker_src)
        self.subjects.append(subject)
        return subject

    def _probes(self, settings: Settings) -> list[CpuProbe]:
        """Redis's CPU time and the broker's (its processes are children of this one)."""
        brokers = child_pids("tansu" if self.options.broker == "bundled" else "java")
        return [redis_probe(settings), lambda: sum(map(cpu_seconds, brokers))]

    async def _measure(
        self,
        settings: Settings,
        subjects: list[Subject],
        start: int,
        done: Callable[[Sample], bool],
        timeout_s: float,
    ) -> Throughput:
        """Sample until ``done``; the rate and CPU from count ``start`` to the last sample."""
        samples = await sample_until(subjects, done, timeout_s, self._probes(settings))
        end = samples[-1].count
        w = window(samples, start, end) if done(samples[-1]) else None
        if w is None:
            raise ConfigError(
                f"{subjects[0].name} processed {end:,} events in {timeout_s:g} s "
                f"(the measurement starts at {start:,}); see {subjects[0].log_path}"
            )
        own, redis_cores, broker_cores = w.cpu_cores
        return Throughput(
            name=f"{len(subjects)} process" + ("es" if len(subjects) > 1 else ""),
            events=w.events,
            seconds=round(w.seconds, 2),
            events_per_s=round(w.rate, 1),
            cpu_cores=round(own, 3),
            peak_rss_mib=round(sum(memory_mib(s.pid) for s in subjects), 1),
            redis_cpu_cores=round(redis_cores, 3),
            broker_cpu_cores=round(broker_cores, 3),
        )

    async def _throughput_and_latency(
        self, settings: Settings, stream: Iterator[ReplayMessage], result: BenchResult
    ) -> None:
        o = self.options
        from training.ops.bench_references import start_reference

        start, end = o.warmup_events, o.warmup_events + o.events
        timeout = 60 + end / 1000
        self.say(f"publishing {end:,} transactions (warm-up {start:,})")
        published = await replay(iter(take_transactions(stream, end)), settings, rate=0)
        self.say(f"published at {published.rate:,.0f}/s")

        def reached_end(sample: Sample) -> bool:
            return sample.count >= end

        if o.references:
            limit = start_reference("limit", settings, self.workdir)
            self.subjects.append(limit)
            result.limit = await self._measure(settings, [limit], start, reached_end, timeout)
            limit.stop()
            self.say(f"limit: {result.limit.events_per_s:,.0f} events/s")

        workers = [self._worker(settings, i) for i in range(o.workers)]
        await wait_ready(workers)
        before = await redis_stats(settings)
        worker = await self._measure(settings, workers, start, reached_end, timeout)
        after = await redis_stats(settings)
        result.redis = {
            "script_us_per_event": round((after["evalsha_usec"] - before["evalsha_usec"]) / end, 1),
            "script_calls": after["evalsha_calls"] - before["evalsha_calls"],
            "used_memory_mib": round(after["used_memory"] / 2**20, 1),
        }
        result.partition_split = partition_split(workers)
        self.say(f"worker ({worker.name}): {worker.events_per_s:,.0f} events/s")

        result.worker = worker  # the offered loads below run in fresh processes
        for w in workers:
            w.stop()
        if o.cold_events:
            result.cold = await self._cold_drain(settings, stream)
        if not o.latency:
            return

        loads = list(o.loads)
        if o.max_load:
            loads.append(float(int(min(worker.events_per_s, MAX_LOAD_RESERVED) / 100) * 100))
        for i, rate in enumerate(loads):
            if o.references:
                result.floor_latencies.append(await self._floor(settings, stream, rate, i))
            # Fresh topics per load (the bundled broker slows down as a partition fills with
            # small batches, see _SOAK_SLICE_S), a fresh worker, the same Redis state.
            phase = self._phase(settings, f"-load{i}")
            await ensure_input_topics(phase)
            live = self._worker(phase, i + 1)
            await wait_scoring(live)
            self.say(f"offered load {rate:,.0f} events/s for {o.load_seconds:g} s")
            n = int(rate * o.load_seconds)
            latency = await offered_load(phase, stream, rate=rate, transactions=n, workers=[live])
            result.latencies.append(latency)
            self.say(f"  p50 {latency.p50_ms} ms, p99 {latency.p99_ms} ms")
            live.stop()

        if o.references:
            naive = start_reference("naive", settings, self.workdir)
            self.subjects.append(naive)
            skip = 1000  # start-up and first connections
            began: list[float] = []

            def ran_long_enough(sample: Sample) -> bool:
                if sample.count >= skip and not began:
                    began.append(sample.t)
                return bool(began) and sample.t - began[0] >= o.naive_seconds

            result.naive = await self._measure(
                settings, [naive], skip, ran_long_enough, 120 + o.naive_seconds
            )
            naive.stop()
            self.say(f"naive: {result.naive.events_per_s:,.0f} events/s")

    async def _cold_drain(self, settings: Settings, stream: Iterator[ReplayMessage]) -> ColdDrain:
        """A backlog published with no worker running, then worker(s) started on it: from
        their spawn to the last score record (topics and a consumer group of its own, the
        same Redis state, as after an outage)."""
        o = self.options
        n = o.cold_events
        phase = self._phase(settings, "-cold")
        self.say(f"cold drain: publishing {n:,} transactions, no worker running")
        backlog = [
            dataclasses.replace(
                m, topic=phase.topic_labels if m.is_label else phase.topic_transactions
            )
            for m in take_transactions(stream, n)
        ]  # the stream names the first phase's topics
        await replay(iter(backlog), phase, rate=0)
        probes = self._probes(phase)
        redis_before, broker_before = (probe() for probe in probes)
        spawned = time.time()
        workers = [self._worker(phase, i, "cold") for i in range(o.workers)]
        try:
            samples = await sample_until(
                workers, lambda sample: sample.count >= n, 120 + n / 1000, probes
            )
            reached = _crossing(samples, n)
            if reached is None:
                raise ConfigError(
                    f"cold drain: {samples[-1].count:,} of {n:,} events scored in "
                    f"{120 + n / 1000:g} s; see {workers[0].log_path}"
                )
            worker_cpu, redis_cpu, broker_cpu = reached[1]
            rss = sum(memory_mib(w.pid) for w in workers)
        finally:
            for w in workers:
                w.stop()
        first, last, _ = await score_record_times(phase, n)
        cold = ColdDrain(
            events=n,
            startup_s=round(first - spawned, 2),
            seconds=round(last - spawned, 2),
            events_per_s=round(n / (last - spawned), 1),
            scoring_events_per_s=round(n / (last - first), 1) if last > first else math.nan,
            worker_cpu_s=round(worker_cpu, 2),
            redis_cpu_s=round(redis_cpu - redis_before, 2),
            broker_cpu_s=round(broker_cpu - broker_before, 2),
            peak_rss_mib=round(rss, 1),
        )
        self.say(
            f"cold drain: first score {cold.startup_s:.1f} s after spawn, last {cold.seconds:.1f}"
            f" s: {cold.events_per_s:,.0f} events/s"
        )
        return cold

    def _phase(self, settings: Settings, phase: str) -> Settings:
        """Settings of a phase: topics and a consumer group of its own, the same Redis."""
        return bench_settings(
            settings.kafka_bootstrap_servers,
            self.options,
            self.tag,
            settings.redis_url.get_secret_value(),
            phase=phase,
        )

    async def _floor(
        self, settings: Settings, stream: Iterator[ReplayMessage], rate: float, index: int
    ) -> Latency:
        """The relay reference's latency at ``rate``: the two broker hops alone."""
        o = self.options
        phase = self._phase(settings, f"-relay{index}")
        await ensure_topics(phase)
        from training.ops.bench_references import start_reference

        relay = start_reference("relay", phase, self.workdir)
        self.subjects.append(relay)
        try:
            await wait_scoring(relay)
            n = int(rate * o.load_seconds)
            latency = await offered_load(phase, stream, rate=rate, transactions=n, workers=[relay])
        finally:
            relay.stop()
        self.say(
            f"  relay (broker floor) at {rate:,.0f}/s: "
            f"p50 {latency.p50_ms} ms, p99 {latency.p99_ms} ms"
        )
        return latency

    async def _soak(self, settings: Settings, stream: Iterator[ReplayMessage]) -> dict[str, Any]:
        o = self.options
        settings = settings.model_copy(update={"consumer_fetch_max_wait_ms": _SOAK_FETCH_WAIT_MS})
        worker = self._worker(settings, 0)
        await wait_ready([worker])
        await wait_scoring(worker)
        latencies: list[float] = []
        series: list[dict[str, float]] = []
        started = time.monotonic()

        async def record() -> None:
            seen = 0
            while True:
                stats = await redis_stats(settings)
                p99 = percentiles_ms(latencies[seen:])[2]
                seen = len(latencies)
                series.append(
                    {
                        "t_s": round(time.monotonic() - started, 1),
                        "rss_mib": round(memory_mib(worker.pid, "VmRSS"), 1),
                        "redis_used_memory_mib": round(stats["used_memory"] / 2**20, 1),
                        "p99_ms": round(p99, 2),
                        "scored": worker.count(),
                    }
                )
                await asyncio.sleep(30)

        recorder = asyncio.create_task(record())
        try:
            latency = await offered_load(
                settings,
                stream,
                rate=o.soak_rate,
                transactions=int(o.soak_rate * o.soak_seconds),
                workers=[worker],
                latencies=latencies,
                slice_s=_SOAK_SLICE_S,
                probe_wait_ms=_SOAK_PROBE_WAIT_MS,
            )
        finally:
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
        series.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "rss_mib": round(memory_mib(worker.pid, "VmRSS"), 1),
                "redis_used_memory_mib": round(
                    (await redis_stats(settings))["used_memory"] / 2**20, 1
                ),
                "p99_ms": float("nan"),
                "scored": worker.count(),
            }
        )
        return {"latency": asdict(latency), "series": series}
