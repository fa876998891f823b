"""The lag gauge stays true while the worker is stuck (issue 13.7).

During a Redis outage the scoring loop retries one batch and polls nothing; the lag gauge
used to be refreshed by that loop from the last fetch's high watermark, so it stayed 0
while the backlog grew into the thousands, and the lag and no-commit alerts could not
fire. Here a real worker runs against a redis-server of the test's own, which is killed
while a producer keeps writing: the gauge scraped from ``/metrics`` must grow with the
backlog and equal what the broker holds past the group's commits, then drain to 0 once
Redis is back. (``monitoring/alerts_test.yml`` shows the alerts firing on that shape.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream_app.config import Settings
from stream_app.kafka import config as kafka_config
from tests.resilience_helpers import (
    BackgroundPublisher,
    label_messages,
    publish,
    simulated,
    transaction_messages,
    wait_until,
)
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]

BEFORE = 1_000  # scored before the outage
DURING = 3_000  # published while Redis is down
LABELS = 300  # labels of transactions scored before, published while Redis is down
RATE = 500.0


def _lag(worker: WorkerProcess, topic: str) -> float | None:
    """The sum of the worker's lag gauges for ``topic`` (None: no gauge, or no endpoint)."""
    values = [
        value
        for name, value in worker.scrape().items()
        if name.startswith("fraudstream_consumer_lag{") and f'topic="{topic}"' in name
    ]
    return sum(values) if values else None


async def _broker_backlog(settings: Settings, group: str, topic: str) -> int:
    """What the broker holds past the group's committed offsets (end offsets as a
    downstream reader of the worker's isolation level sees them)."""
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    consumer = AIOKafkaConsumer(
        **kafka_config.client_kwargs(settings),
        group_id=None,
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
    )
    await admin.start()
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        ends = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        return sum(
            end - max(committed[tp].offset, 0) if tp in committed else end
            for tp, end in ends.items()
        )
    finally:
        await consumer.stop()
        await admin.close()


def test_the_lag_gauge_grows_with_the_backlog_during_a_redis_outage(
    make_settings: Callable[..., Settings], served_model: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        settings = make_settings(
            model_dir=served_model,
            redis_url=server.url,
            redis_timeout_s=1.0,
            retry_backoff_max_s=1.0,
        )
        topic = settings.topic_transactions
        frame = simulated(n_customers=100, n_days=40, seed=4)
        messages = transaction_messages(frame, settings)
        labels = label_messages(frame, settings, LABELS)
        assert len(messages) >= BEFORE + DURING and len(labels) == LABELS
        with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
            publish(settings, messages[:BEFORE], rate=RATE)
            worker.wait_for('fraudstream_events_total{outcome="scored"}', BEFORE)
            wait_until(lambda: _lag(worker, topic) == 0, 30, "no lag before the outage")
            committed_at = worker.metric("fraudstream_last_commit_timestamp_seconds")

            server.kill()
            publish(settings, labels)  # the labels are stuck too: their lag must show
            publisher = BackgroundPublisher(settings, messages[BEFORE : BEFORE + DURING], RATE)
            publisher.start()
            samples: list[float] = []
            while publisher.published < DURING and publisher.error is None:
                time.sleep(1.0)
                samples.append(_lag(worker, topic) or 0.0)
            publisher.join()
            time.sleep(2.5)  # two refreshes of the gauge after the last message
            lag = _lag(worker, topic) or 0.0
            backlog = asyncio.run(_broker_backlog(settings, settings.scoring_group_id, topic))
            print(f"lag during the outage: {samples} -> {lag}; broker backlog {backlog}")
            # All of it was published after the last commit, and nothing committed since.
            assert worker.metric("fraudstream_last_commit_timestamp_seconds") == committed_at
            # The broker's end offsets may trail the acknowledged writes by a few records
            # (seen on the bundled broker: 3 of 3,000, for a second or two): 1% of slack.
            assert backlog >= 0.99 * DURING
            # Exact: the gauge is the broker's end offsets minus the group's commits, read
            # at most a second ago, and neither has moved since the publisher stopped.
            assert lag == backlog, worker.log()
            # And it grew while the producer wrote (a gauge refreshed every second, sampled
            # every second at 500 events/s: each sample at least the previous).
            assert samples and samples[-1] > samples[0] and samples == sorted(samples)
            # The labels, read by the same group and stuck on Redis as well, show in the
            # same gauge: all of them, as none is committed before it is applied.
            labels_lag = _lag(worker, settings.topic_labels)
            labels_backlog = asyncio.run(
                _broker_backlog(settings, settings.scoring_group_id, settings.topic_labels)
            )
            print(f"labels lag during the outage: {labels_lag}; broker backlog {labels_backlog}")
            assert labels_lag == LABELS, worker.log()
            # (The broker's ListOffsets may say less: the bundled broker answers the start of
            # a partition's last record batch. The gauge also takes the fetched high
            # watermark, which is exact.)
            assert labels_backlog <= LABELS

            server.start()  # same port and directory: the worker reconnects by itself
            wait_until(lambda: _lag(worker, topic) == 0, 90, "the lag to drain to 0")
            wait_until(
                lambda: _lag(worker, settings.topic_labels) == 0, 60, "the labels lag to drain"
            )
            worker.wait_for('fraudstream_events_total{outcome="scored"}', BEFORE + DURING)
    finally:
        server.stop()
