"""Session services and per-test names for the integration tests.

* ``kafka_broker``: parametrised over both brokers, each started once per session: the
  bundled Kafka-protocol broker (``bundled_broker``; ``FRAUDSTREAM_TEST_KAFKA_BOOTSTRAP``
  to use a running one) and Apache Kafka (``apache_kafka``), on which the worker runs with
  the settings ``docker-compose.yml`` deploys (exactly-once, idempotent producer);
* ``make_settings``: worker :class:`Settings` on that broker and the real Redis, with topics,
  consumer group and Redis key prefix no other test uses (keys deleted afterwards);
* :func:`read_topic`: what a worker published (the worker subprocess itself is
  :class:`training.ops.services.worker_process.WorkerProcess`);
* ``small_transactions``: a small simulated dataset, built once per session (the models
  the worker tests serve are in ``tests/model_fixtures.py``).

``tests/conftest.py`` re-exports the fixtures, so any test module can ask for them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from stream_app.config import Settings, load_settings
from stream_app.kafka import config as kafka_config
from tests.cleanup import register_prefix
from training.ops.services.apache_kafka import ApacheKafka
from training.ops.services.brokers import BROKER_KINDS, BrokerKind, deployed_settings
from training.ops.services.bundled_broker import BundledBroker

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
