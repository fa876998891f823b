"""Session services and per-test names for the integration tests.

* ``kafka_broker``: parametrised over both brokers, each started once per session: the
  bundled Kafka-protocol broker (``bundled_broker``; ``FRAUDSTREAM_TEST_KAFKA_BOOTSTRAP``
  to use a running one) and Apache Kafka (``apache_kafka``), on which the worker runs with
  the settings ``docker-compose.yml`` deploys (exactly-once, idempotent producer);
* ``make_settings``: worker :class:`Settings` on that broker and the real Redis, with topics,
  consumer group and Redis key prefix no other test uses (keys deleted afterwards);
* :class:`WorkerProcess`: the worker as a real subprocess (SIGTERM, SIGKILL), and
  :func:`read_topic` to read what it published;
* ``small_transactions``: a small simulated dataset, built once per session (the models
  the worker tests serve are in ``tests/model_fixtures.py``).

``tests/conftest.py`` re-exports the fixtures, so any test module can ask for them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from prometheus_client.parser import text_string_to_metric_families

from stream_app.config import Settings, load_settings, settings_environment
from stream_app.kafka import config as kafka_config
from tests.cleanup import register_prefix
from training.ops.services.apache_kafka import ApacheKafka
from training.ops.services.brokers import BROKER_KINDS, BrokerKind, deployed_settings
from training.ops.services.bundled_broker import BundledBroker
from training.ops.services.net import free_port

REDIS_URL = os.environ.get("FRAUDSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Broker:
    """A running broker the integration tests talk to.

    ``kind`` is ``bundled`` (Tansu: no idempotent or transactional producer, no TLS) or
    ``kafka`` (Apache Kafka, where the worker runs with what ``docker-compose.yml`` deploys:
    exactly-once and the idempotent producer).
    """

    kind: BrokerKind
    bootstrap_servers: str

    @property
    def deployed(self) -> dict[str, Any]:
        """The worker settings of this broker's lane."""
        return deployed_settings(self.kind)

    def __str__(self) -> str:
        return self.bootstrap_servers


@pytest.fixture(scope="session")
def bundled_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The bundled Kafka-protocol broker, started once for the session."""
    external = os.environ.get("FRAUDSTREAM_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield Broker("bundled", external)
        return
    broker = BundledBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log")
    broker.start()
    try:
        yield Broker("bundled", broker.bootstrap_servers)
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[Broker]:
    """Apache Kafka (one KRaft node, the compose settings), started once for the session."""
    kafka = ApacheKafka()
    kafka.start()
    try:
        yield Broker("kafka", kafka.bootstrap_servers)
    finally:
        kafka.stop()


@pytest.fixture(scope="session", params=BROKER_KINDS)
def kafka_broker(request: pytest.FixtureRequest) -> Broker:
    """Each broker in turn: a test asking for it runs on the bundled broker and on Kafka."""
    fixture = "bundled_broker" if request.param == "bundled" else "apache_kafka"
    broker: Broker = request.getfixturevalue(fixture)
    return broker


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_settings(broker: Broker | str, **overrides: Any) -> Settings:
    """Worker settings with topics, group and key prefix no other test uses.

    On a :class:`Broker`, the worker runs with that broker's lane settings
    (:attr:`Broker.deployed`); a bare bootstrap string means the bundled broker's.
    """
    if isinstance(broker, str):
        broker = Broker("bundled", broker)
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": broker.bootstrap_servers,
        "redis_url": REDIS_URL,
        "group_id": f"g-{tag}",
        "instance_id": "test",
        **broker.deployed,
        "topic_transactions": f"tx-{tag}",
        "topic_labels": f"labels-{tag}",
        "topic_scores": f"scores-{tag}",
        "topic_alerts": f"alerts-{tag}",
        "topic_shadow_scores": f"shadow-{tag}",
        "topic_dead_letters": f"dlq-{tag}",
        "topic_label_dead_letters": f"labels-dlq-{tag}",
        "topic_controls": f"controls-{tag}",
        "topic_partitions": 2,
        "state_key_prefix": f"test-{tag}",
        "metrics_port": 0,
        "model_poll_interval_s": 0.5,
        "consumer_session_timeout_s": 6.0,
    }
    values.update(overrides)
    register_prefix(values["state_key_prefix"])  # deleted when the test ends, then checked
    return load_settings(**values)


def delete_state(prefix: str) -> None:
    """Delete every Redis key under ``prefix``."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


@pytest.fixture
def make_settings(kafka_broker: Broker) -> Iterator[Callable[..., Settings]]:
    """Factory of worker settings isolated from every other test.

    Each call gets fresh topic names, consumer group and Redis key prefix; keyword
    arguments override any setting. The Redis keys of every prefix handed out are deleted
    when the test ends.
    """
    made: list[Settings] = []

    def factory(**overrides: Any) -> Settings:
        settings = new_settings(kafka_broker, **overrides)
        made.append(settings)
        return settings

    yield factory
    for settings in made:
        delete_state(settings.state_key_prefix)


class WorkerProcess:
    """``fraudstream worker`` as a subprocess, so a test can SIGTERM or SIGKILL it for real.

    Its metrics endpoint (on a free port) tells when it is ready. ``command`` runs another
    install's worker (``tests/stream_app/test_slim_install.py``: a fresh virtual environment's
    ``fraudstream worker``, from ``cwd`` outside the checkout).
    """

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        command: Sequence[str] = (sys.executable, "-m", "stream_app.cli", "worker"),
        cwd: Path | None = None,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = list(command)
        self.cwd = cwd
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        """Where the worker serves its metrics."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(
        self, timeout_s: float = 90.0, until: tuple[str, float] = ("fraudstream_ready", 1.0)
    ) -> WorkerProcess:
        """Start the worker and wait until its scoring consumer has partitions (or, with
        ``until``, until another metric has a value: a worker held not ready)."""
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")},
            **settings_environment(self.settings),
            "FRAUDSTREAM_METRICS_PORT": str(self.metrics_port),
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited early:\n{self.log()}")
            if self.metric(until[0]) == until[1]:
                return self
            time.sleep(0.2)
        self.process.kill()  # the caller's `with` has not begun: nothing else would stop it
        self.process.wait(timeout=30)
        raise AssertionError(f"the worker was not {until} in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        """The worker's output so far (the end of it)."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def scrape(self) -> dict[str, float]:
        """Every sample of the metrics endpoint, ``name{labels}`` -> value ({} if down)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return {}
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

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
            time.sleep(0.2)
        raise AssertionError(f"{name} stayed below {at_least}:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


async def read_topic(
    settings: Settings, topic: str, *, until: int, timeout_s: float = 60.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every message of ``topic`` from the beginning, once there are ``until`` (or time out)."""
    consumer = AIOKafkaConsumer(
        topic,
        **kafka_config.client_kwargs(settings),
        group_id=None,
        auto_offset_reset="earliest",
        # Under exactly-once only committed transactions count: what a downstream reader sees.
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < until and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


@dataclass(frozen=True)
class Dataset:
    """A simulated transactions table, and the file it was written to."""

    frame: pd.DataFrame
    path: Path


def simulate_small(seed: int = 7, n_days: int = 40) -> pd.DataFrame:
    """A small labelled dataset: 60 customers over ``n_days`` days, a few percent fraud."""
    from training.simulator import SimulatorConfig, simulate

    return simulate(
        SimulatorConfig(
            n_customers=60,
            n_terminals=200,
            n_days=n_days,
            radius=10.0,
            seed=seed,
            compromised_terminals_per_day=1,
            terminal_compromise_days=7,
            compromised_customers_per_day=1,
            customer_compromise_days=7,
        )
    )


@pytest.fixture(scope="session")
def small_transactions(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """About 4,000 simulated transactions over 40 days, written as Parquet."""
    from training.transactions import write_transactions

    frame = simulate_small()
    path = tmp_path_factory.mktemp("data") / "transactions.parquet"
    write_transactions(frame, path)
    return Dataset(frame, path)
