"""``fraudstream bench``'s references and clocks: the relay (the latency floor) must be a
faithful copy, and the cold drain's clock must span every score record."""

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
from stream_app.config import Settings
from stream_app.errors import ConfigError
from stream_app.kafka import config as kafka_config
from stream_app.kafka.config import ensure_topics
from stream_app.records import TransactionEvent
from stream_app.state.store import TransactionUpdate
from tests.feature_cases import BASE_MS
from tests.kafka_fixtures import read_topic
from tests.memory_state import MemoryStateStore
from training.ops.bench import BenchResult, ColdDrain, Throughput, score_record_times, wait_scoring
from training.ops.bench_commands import render_markdown
from training.ops.bench_references import NaiveState, start_reference

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


async def test_the_cold_drain_clock_spans_every_score_record_duplicates_included(
    make_settings: Callable[..., Settings],
) -> None:
    # 40 score records of 35 transactions, sent out of time order over 3 partitions; the
    # latest timestamp is a re-sent duplicate's, sent last.
    settings = make_settings(topic_partitions=3)
    await ensure_topics(settings)
    base_ms = int(time.time() * 1000) - 60_000
    stamps = [base_ms + 1000 * i for i in range(40)]
    order = [*range(5, 35), *range(5), *range(35, 40)]
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    try:
        for i in order:
            value = json.dumps({"transaction_id": str(i if i < 35 else i - 35)}).encode()
            await producer.send(
                settings.topic_scores, value, partition=i % 3, timestamp_ms=stamps[i]
            )
        await producer.flush()
    finally:
        await producer.stop()
    first, last, scored = await score_record_times(settings, 35, timeout_s=30)
    assert (first, last, scored) == (stamps[0] / 1000, stamps[-1] / 1000, 35)
    with pytest.raises(ConfigError, match="scores of 35 transactions, not 36"):
        await score_record_times(settings, 36, timeout_s=3)


def test_the_report_sets_the_cold_drain_beside_the_steady_rate_and_the_limit() -> None:
    def path(events_per_s: float, cpu_cores: float) -> Throughput:
        return Throughput(
            "1 process", 200_000, 200_000 / events_per_s, events_per_s, cpu_cores, 190.0, 0.5, 0.05
        )

    cold = ColdDrain(300_000, 2.5, 37.5, 8_000.0, 8_571.4, 18.0, 12.0, 1.5, 200.0)
    result = BenchResult(
        started_at="2026-11-30T22:40:00Z",
        machine={
            "cpu": "x",
            "cores": 2,
            "memory_gib": 23.5,
            "kernel": "6",
            "python": "3.11",
            "onnxruntime": "1",
        },
        model_version="m",
        data="data/tx.parquet",
        settings={"broker": "bundled", "warmup_events": 50_000},
        worker=path(10_000.0, 0.6),
        limit=path(50_000.0, 0.5),
        cold=cold,
    )
    assert BenchResult.from_json(result.to_json()) == result
    table = render_markdown(result)
    # 18 CPU seconds over 300,000 events: 60 µs each; the steady worker is 1.25x faster.
    assert "| 300,000 in 37.5 s | 8,000 | 0.48 | 60.0 | 200 | 0.32 | 40.0 | 0.04 | 1.25x |" in table
    assert "first score record came 2.5 s after the spawn" in table
    assert "worker ÷ limit 20%, cold drain ÷ worker 80%" in table
    assert "| cold drain >= 85% of the steady rate | 80% | **no** |" in table
