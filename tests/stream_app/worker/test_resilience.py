"""Outages: the worker retries with backoff, says so, and recovers without losing anything."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from stream_app.config import Settings
from stream_app.models.scorer import OnnxScorer
from stream_app.records import ScoreRecord
from tests.kafka_fixtures import Dataset, read_topic
from tests.stream_app.worker.test_replay import probe_labels, publish, stream
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own: pausing the shared one would stall other tests."""
    with RedisServer(tmp_path / "redis", durable=False) as server:
        yield server.url


def test_a_redis_stall_is_retried_and_nothing_is_lost(
    make_settings: Callable[..., Settings],
    served_model: Path,
    small_transactions: Dataset,
    private_redis: str,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        model_dir=served_model,
        redis_url=private_redis,
        redis_timeout_s=0.5,
        retry_backoff_max_s=0.5,
    )
    frame = small_transactions.frame
    n = len(frame)
    messages = stream(frame, settings, labels_delay=None, detour=False)
    labels = [m for m in messages if m.topic == settings.topic_labels]
    rest = [m for m in messages if m.topic != settings.topic_labels]
    stalled = threading.Event()

    def stall_redis() -> None:
        # Every client's commands wait 3 s: each call of the worker times out meanwhile.
        with redis.Redis.from_url(private_redis, socket_timeout=10) as client:
            client.execute_command("CLIENT", "PAUSE", "3000", "ALL")

    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        probe_labels(settings, worker)
        asyncio.run(publish(settings, labels, rate=10_000))
        # Before their transactions, labels wait for them (the probe's too).
        worker.wait_for(
            'fraudstream_labels_total{outcome="pending"}', int(frame["TX_FRAUD"].sum()) + 1
        )

        def stall_mid_stream(_published: int) -> None:
            scored = worker.metric('fraudstream_events_total{outcome="scored"}') or 0
            if not stalled.is_set() and scored > n / 3:
                stalled.set()
                threading.Thread(target=stall_redis, daemon=True).start()

        asyncio.run(publish(settings, rest, rate=800, on_progress=stall_mid_stream))
        assert stalled.is_set()
        records = asyncio.run(read_topic(settings, settings.topic_scores, until=n))
        worker.wait_for('fraudstream_events_total{outcome="scored"}', 1)
        metrics = worker.scrape()
        log = worker.log()
        assert worker.terminate() == 0

    assert metrics["fraudstream_redis_errors_total"] >= 1
    assert "updating state" in log and "succeeded again" in log
    assert metrics["fraudstream_ready"] == 1
    scores: dict[str, ScoreRecord] = {}
    for message in records:
        record = ScoreRecord.from_json(message.value)
        scores.setdefault(record.transaction_id, record)
    reference = score_table(frame, OnnxScorer(served_model)).table
    ids = [str(t) for t in reference["TRANSACTION_ID"]]
    assert sorted(scores) == sorted(ids)
    ours = np.array([scores[t].score for t in ids])
    np.testing.assert_allclose(ours, reference["score"].to_numpy(), rtol=0, atol=1e-5)


def test_a_second_worker_joining_mid_stream_shares_the_work_without_loss_or_double_count(
    make_settings: Callable[..., Settings],
    served_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    settings = make_settings(model_dir=served_model)
    frame = small_transactions.frame
    n = len(frame)
    messages = stream(frame, settings, labels_delay=None, detour=False)
    rest = [m for m in messages if m.topic != settings.topic_labels]
    first = WorkerProcess(settings, tmp_path / "first.log").start()
    second = WorkerProcess(
        # Each replica has a name of its own (under exactly-once, its transactional id).
        settings.model_copy(update={"instance_id": "test-second"}),
        tmp_path / "second.log",
    )
    with first, second:
        joined = threading.Event()

        def join_mid_stream(_published: int) -> None:
            scored = first.metric('fraudstream_events_total{outcome="scored"}') or 0
            if not joined.is_set() and scored > n / 3:
                joined.set()
                second.start()  # publishing pauses until the group has rebalanced

        asyncio.run(publish(settings, rest, rate=700, on_progress=join_mid_stream))
        records = asyncio.run(read_topic(settings, settings.topic_scores, until=n))
        key = 'fraudstream_events_total{outcome="scored"}'
        for _ in range(100):  # both have settled their last batches
            counts = [worker.metric(key) or 0 for worker in (first, second)]
            if sum(counts) >= n:
                break
            threading.Event().wait(0.2)
        assert first.terminate() == 0 and second.terminate() == 0

    assert all(count > 0 for count in counts), "both workers scored some"
    # Each transaction changed the state exactly once, whichever worker saw it first (a
    # re-processed one counts as a duplicate).
    assert sum(counts) == n
    seen: dict[str, ScoreRecord] = {}
    for message in records:
        record = ScoreRecord.from_json(message.value)
        if record.transaction_id in seen:
            assert record.model_dump(exclude={"scored_at"}) == seen[
                record.transaction_id
            ].model_dump(exclude={"scored_at"})
        seen.setdefault(record.transaction_id, record)
    assert sorted(seen) == sorted(str(t) for t in frame["TRANSACTION_ID"])
