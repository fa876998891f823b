"""The relay reference of ``fraudstream bench``: the latency floor must be a faithful copy."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from stream_app import features as F
from stream_app import kafka_config
from stream_app.config import Settings
from stream_app.kafka_config import ensure_topics
from stream_app.records import TransactionEvent
from stream_app.state import MemoryStateStore, TransactionUpdate
from tests.feature_cases import BASE_MS
from tests.kafka_fixtures import read_topic
from training.bench import wait_scoring
from training.bench_references import NaiveState, start_reference

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


async def test_the_naive_state_computes_the_workers_terminal_windows(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # Ten customers on two terminals over 40 days at random minutes, one event at a time
    # through the naive reference, each against the reference store (no labels: no frauds).
    rng = np.random.default_rng(5)
    times = np.sort(BASE_MS + rng.integers(0, 40 * F.MS_PER_DAY // 60_000, 300) * 60_000)
    naive = NaiveState(redis_client, redis_prefix, sequence_length=3)
    reference = MemoryStateStore(sequence_length=3)
    for i, time_ms in enumerate(times.tolist()):
        event = TransactionEvent(
            transaction_id=f"tx{i}",
            customer_id=f"c{i % 10}",
            terminal_id=f"t{i % 2}",
            amount=1.0,
            timestamp=dt.datetime.fromtimestamp(time_ms / 1000, dt.UTC),
        )
        update = TransactionUpdate(f"tx{i}", f"c{i % 10}", f"t{i % 2}", time_ms, 1.0)
        expected = (await reference.apply_transactions([update])).history
        got = await naive.apply(event)
        assert got.terminal_tx.tolist() == expected.terminal_tx.tolist(), i
        assert got.times_ms.tolist() == expected.times_ms.tolist(), i
    assert expected.terminal_tx[-1].min() > 0  # the windows were not all empty
