"""Kafka errors no retry changes stop the worker with what to fix, never a silent loop.

A transaction that fails validation is dead-lettered as it came. If the dead-letter topic
cannot take it (its ``max.message.bytes`` below ``FRAUDSTREAM_MAX_PAYLOAD_BYTES``), the
brokers refuse the batch's outputs, and before this the worker retried them for ever:
nothing scored, nothing committed, a "still waiting" line pointing at the address. Now:

* at start-up, a dead-letter topic too small for the largest accepted message stops the
  worker with exit code 2, naming the topic, its limit and the setting;
* while running (the topic shrunk after start-up), the refused batch stops the worker with
  exit code 1 and an ERROR line saying what to fix; nothing of the batch is committed, so
  the restart (which then stops at start-up, as above) loses nothing.

Apache Kafka only: the bundled broker has no per-topic message size.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from stream_app.config import Settings
from stream_app.kafka import config as kafka_config
from tests.kafka_fixtures import Broker, new_settings
from tests.resilience_helpers import Message, publish, run_worker_to_exit, wait_until
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience]

SMALL = 4096  # the dead-letter topic's max.message.bytes in these tests


async def _admin(settings: Settings, work: Any) -> None:
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        await work(admin)
    finally:
        await admin.close()


def create_small_dead_letter_topic(settings: Settings) -> None:
    topic = NewTopic(
        settings.topic_dead_letters, 2, 1, topic_configs={"max.message.bytes": str(SMALL)}
    )
    asyncio.run(_admin(settings, lambda admin: admin.create_topics([topic])))


def shrink_dead_letter_topic(settings: Settings) -> None:
    resource = ConfigResource(
        ConfigResourceType.TOPIC, settings.topic_dead_letters, {"max.message.bytes": str(SMALL)}
    )
    asyncio.run(_admin(settings, lambda admin: admin.alter_configs([resource])))


def test_a_dead_letter_topic_too_small_stops_the_worker_at_start_up(
    apache_kafka: Broker, served_model: Path
) -> None:
    settings = new_settings(apache_kafka, model_dir=served_model)
    create_small_dead_letter_topic(settings)
    code, output = run_worker_to_exit(settings, timeout_s=60)
    assert code == 2, output
    assert "Traceback" not in output, output
    assert f"topic {settings.topic_dead_letters} accepts messages of up to {SMALL}" in output
    assert "FRAUDSTREAM_MAX_PAYLOAD_BYTES=16384" in output


def test_a_record_the_brokers_refuse_as_too_large_stops_the_worker_with_the_fix(
    apache_kafka: Broker, served_model: Path, tmp_path: Path
) -> None:
    settings = new_settings(apache_kafka, model_dir=served_model)
    oversized = Message(settings.topic_transactions, b"c1", b"{" + b"x" * 8000)  # not JSON
    valid = [
        Message(
            settings.topic_transactions,
            b"c1",
            orjson.dumps(
                {
                    "transaction_id": f"t{i}",
                    "customer_id": "c1",
                    "terminal_id": "7",
                    "amount": 12.5,
                    "timestamp": "2018-04-01T00:00:00Z",
                }
            ),
        )
        for i in range(5)
    ]
    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        assert worker.process is not None
        shrink_dead_letter_topic(settings)
        publish(settings, [oversized, *valid])
        wait_until(lambda: worker.process.poll() is not None, 60, "the worker to stop")
        code, log = worker.process.returncode, worker.log()
        committed = worker.metric("fraudstream_offsets_committed_total")
    assert code == 1, log
    said = [line for line in log.splitlines() if "which no retry changes" in line]
    assert said and "[ERROR]" in said[0] and said[0].rstrip().endswith("stopping the worker"), log
    assert "MessageSizeTooLargeError" in said[0] and "FRAUDSTREAM_MAX_PAYLOAD_BYTES" in said[0]
    assert "Traceback" not in log, log  # the message says what to fix; no stack hides it
    assert not committed  # the batch stays to be redone
    # The restart stops at start-up with the topic and its limit named.
    code, output = run_worker_to_exit(settings, timeout_s=60)
    assert code == 2 and f"accepts messages of up to {SMALL}" in output, output
