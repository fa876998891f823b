"""The relay reference of ``fraudstream bench``: the latency floor must be a faithful copy."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from stream_app import kafka_config
from stream_app.config import Settings
from stream_app.kafka_config import ensure_topics
from tests.kafka_fixtures import read_topic
from training.bench import wait_scoring
from training.bench_references import start_reference

pytestmark = [pytest.mark.integration]


async def test_relay_copies_every_message_unchanged_after_it_is_ready(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(topic_partitions=2)
    await ensure_topics(settings)
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    relay = start_reference("relay", settings, tmp_path)
    try:
        # Produced before the relay consumes: it starts at the end, so these are not relayed.
        await producer.send_and_wait(settings.topic_transactions, b"before", key=b"k", partition=0)
        await wait_scoring(relay, timeout_s=60)
        sent = {
            (f"key-{i}".encode(), json.dumps({"transaction_id": str(i)}).encode(), i % 2)
            for i in range(200)
        }
        for key, value, partition in sent:
            await producer.send(settings.topic_transactions, value, key=key, partition=partition)
        await producer.flush()
        records = await read_topic(settings, settings.topic_scores, until=len(sent), timeout_s=60)
        assert {(r.key, r.value, r.partition) for r in records} == sent
        deadline = time.monotonic() + 10
        while relay.count() < len(sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert relay.count() == len(sent)
    finally:
        await producer.stop()
        relay.stop()
    assert relay.process.returncode == 0  # SIGTERM ends it cleanly
