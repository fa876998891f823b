"""Labels and transactions share one consumer group, one commit path and one lag gauge.

The worker used to read labels with a Faust agent, in a consumer group of its own with its
own commit path: during a Redis outage on the bundled broker it committed 98 of 300 labels
it could not apply, and a worker restarted after such a commit never applied them. Here a
real worker runs against a redis-server of the test's own, which is killed before labels
are published:

* while Redis is down, no label is committed (the group's commits on the labels topic stay
  where they were) and the one lag gauge shows every label as lag;
* the worker is then SIGKILLed, Redis comes back, a new worker starts: every label is
  applied, and the state equals the state of an uninterrupted run (transactions, then
  labels, applied straight into Redis);
* all along, the worker's consumers form one group, which reads the transactions, the
  repartition and the labels topics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from stream_app.config import Settings
from stream_app.kafka import config as kafka_config
from stream_app.records import ValidationLimits
from stream_app.scoring.pipeline import Inbound, label_update
from stream_app.state.redis import RedisStateStore
from stream_app.worker.membership import parse_assigned
from tests.model_fixtures import TEST_SEQUENCE_LENGTH
from tests.resilience_helpers import (
    Message,
    label_messages,
    publish,
    redis_state,
    simulated,
    transaction_messages,
    uninterrupted_state,
    wait_until,
)
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]

TRANSACTIONS = 600  # scored before the outage
LABELS = 300  # verdicts on the first of them, published while Redis is down
HELD_S = 4.0  # how long the labels wait in the outage before the worker is killed


def _lag(worker: WorkerProcess, topic: str) -> float | None:
    """The sum of the worker's lag gauges for ``topic`` (None: no gauge)."""
    values = [
        value
        for name, value in worker.scrape().items()
        if name.startswith("fraudstream_consumer_lag{") and f'topic="{topic}"' in name
    ]
    return sum(values) if values else None


async def _groups(settings: Settings) -> dict[str, set[str]]:
    """Each consumer group named after ``group_id`` that has members: the topics its
    members subscribe to (empty when the broker does not describe them)."""
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        candidates = [settings.group_id, settings.scoring_group_id]
        try:
            listed = await admin.list_consumer_groups()
        except Exception:  # a broker without ListGroups: the groups the worker ever used
            listed = []
        candidates += [g[0] for g in listed if str(g[0]).startswith(settings.group_id)]
        found: dict[str, set[str]] = {}
        for group in sorted(set(candidates)):
            for response in await admin.describe_consumer_groups([group]):
                for described in response.to_object()["groups"]:
                    topics: set[str] = set()
                    for member in described["members"]:
                        # What it subscribed to (the bundled broker does not say: empty).
                        if member["member_metadata"]:
                            raw = member["member_metadata"]
                            topics |= set(ConsumerProtocolMemberMetadata.decode(raw).subscription)
                    if described["members"]:
                        found[group] = topics
        return found
    finally:
        await admin.close()


async def _committed_labels(settings: Settings) -> dict[str, int]:
    """What each of the worker's possible groups committed on the labels topic, in all."""
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        partitions = [
            TopicPartition(settings.topic_labels, p) for p in range(settings.topic_partitions)
        ]
        totals: dict[str, int] = {}
        for group in (settings.group_id, settings.scoring_group_id):
            offsets = await admin.list_consumer_group_offsets(group, partitions=partitions)
            totals[group] = sum(max(meta.offset, 0) for meta in offsets.values())
        return totals
    finally:
        await admin.close()


def _apply_labels(url: str, prefix: str, labels: list[Message]) -> None:
    """Apply the labels straight into the state under ``prefix`` (the reference run)."""
    limits = ValidationLimits()

    async def apply() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            store = RedisStateStore(client, prefix=prefix, sequence_length=TEST_SEQUENCE_LENGTH)
            updates = [
                label_update(Inbound(m.topic, 0, i, m.key, m.value, 0), limits)
                for i, m in enumerate(labels)
            ]
            await store.apply_labels(updates)
        finally:
            await client.aclose()

    asyncio.run(apply())


def test_labels_held_by_a_redis_outage_are_applied_once_it_is_back(
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
        frame = simulated(n_customers=100, n_days=40, seed=4)
        transactions = transaction_messages(frame, settings, limit=TRANSACTIONS)
        labels = label_messages(frame, settings, LABELS)
        assert len(labels) == LABELS
        tx, labels_topic = settings.topic_transactions, settings.topic_labels

        with WorkerProcess(settings, tmp_path / "worker-1.log").start() as worker:
            # One group, reading both streams (the repartition topic too).
            groups = asyncio.run(_groups(settings))
            assert list(groups) == [settings.scoring_group_id], groups
            if settings.exactly_once:  # Apache Kafka describes the members' subscriptions
                assert groups[settings.scoring_group_id] == {
                    tx,
                    settings.topic_repartition,
                    labels_topic,
                }
            # Its log names them, as the bench reads each worker's share of the partitions.
            assignments = [
                names
                for line in worker.log_path.read_text(errors="replace").splitlines()
                if (names := parse_assigned(line)) is not None
            ]
            assert assignments, worker.log()
            read = {name.rsplit("[", 1)[0] for name in assignments[-1]}
            assert read == {tx, settings.topic_repartition, labels_topic}, assignments
            publish(settings, transactions)
            worker.wait_for('fraudstream_events_total{outcome="scored"}', TRANSACTIONS)
            wait_until(lambda: _lag(worker, tx) == 0, 30, "the transactions to be committed")
            assert _lag(worker, labels_topic) == 0  # the one gauge covers the labels too

            server.kill()
            publish(settings, labels)
            wait_until(
                lambda: (worker.metric("fraudstream_redis_errors_total") or 0) >= 1,
                15,
                "the worker to count a Redis error",
            )
            time.sleep(HELD_S)  # several commit intervals: nothing may be committed
            # Nothing committed: no group of the worker moved on the labels topic...
            assert asyncio.run(_committed_labels(settings)) == {
                settings.group_id: 0,
                settings.scoring_group_id: 0,
            }, worker.log()
            # ...and the gauge shows every label as lag.
            wait_until(lambda: _lag(worker, labels_topic) == LABELS, 5, "the labels lag")
            worker.kill()  # what it held in memory is gone with it

        server.start()  # same port and directory: the state before the outage is back
        with WorkerProcess(settings, tmp_path / "worker-2.log").start() as worker:
            wait_until(lambda: _lag(worker, labels_topic) == 0, 60, "the labels to be applied")
            applied = worker.scrape()
            assert worker.terminate() == 0, worker.log()
        handled = sum(
            value
            for name, value in applied.items()
            if name.startswith("fraudstream_labels_total{")
            and 'outcome="dead_letter"' not in name
            and 'outcome="expired"' not in name
        )
        assert handled == LABELS, applied
        assert asyncio.run(_committed_labels(settings))[settings.scoring_group_id] == LABELS

        # Every label applied, once: the state of an uninterrupted run.
        reference = settings.state_key_prefix + "-reference"
        uninterrupted_state(
            server.url, reference, frame, sequence_length=TEST_SEQUENCE_LENGTH, limit=TRANSACTIONS
        )
        _apply_labels(server.url, reference, labels)
        with server.client() as client:
            assert redis_state(client, settings.state_key_prefix) == redis_state(client, reference)
    finally:
        server.stop()
