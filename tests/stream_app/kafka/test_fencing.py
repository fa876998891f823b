"""Transactional offsets carry the group generation: Apache Kafka refuses a stale member's.

Apache Kafka only: the bundled broker has no transactions. A worker's producer commits its
input offsets inside each transaction; with :func:`fence_by_generation` they go with its
consumer's generation and member id (TxnOffsetCommit v3, KIP-447), so once the group has
moved on (another member owns the partitions) the broker refuses them and the transaction
can only abort, whatever the worker itself believes. The tests drive a real consumer
group on the session's Apache Kafka.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from stream_app.kafka.fencing import GroupFencedError, fence_by_generation, group_metadata
from tests.kafka_fixtures import Broker

pytestmark = [pytest.mark.integration]


async def _group_member(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=6_000,
        isolation_level="read_committed",
    )
    await consumer.start()
    for _ in range(200):  # until the group has given it its partitions
        await consumer.getmany(timeout_ms=50)
        if consumer.assignment():
            break
    assert consumer.assignment(), "the consumer never joined its group"
    return consumer


async def _committed(bootstrap: str, group: str, tp: TopicPartition) -> int | None:
    """The group's committed offset of ``tp`` once it stops changing (a transaction's
    offsets appear once its commit markers are written, a moment after the commit)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        seen: list[int | None] = []
        for _ in range(50):
            offsets = await admin.list_consumer_group_offsets(group)
            found = offsets.get(tp)
            seen.append(None if found is None else int(found.offset))
            if len(seen) >= 5 and len(set(seen[-5:])) == 1 and seen[-1] is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    return seen[-1]


async def _commit_in_transaction(
    producer: AIOKafkaProducer, topic: str, tp: TopicPartition, offset: int, group: str
) -> None:
    async with producer.transaction():
        await producer.send_and_wait(topic, b"output", partition=0)
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(offset, "")}, group)


async def test_the_current_member_commits_and_a_stale_one_is_refused(
    apache_kafka: Broker,
) -> None:
    bootstrap = apache_kafka.bootstrap_servers
    tag = uuid.uuid4().hex[:8]
    source, sink, group = f"fence-in-{tag}", f"fence-out-{tag}", f"fence-{tag}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(source, 1, 1), NewTopic(sink, 1, 1)])
    await admin.close()
    tp = TopicPartition(source, 0)

    first = await _group_member(bootstrap, source, group)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"fence-{tag}")
    await producer.start()
    try:
        fence_by_generation(producer, group_metadata(first))
        # The member the group gave the partition to: its offsets commit.
        await _commit_in_transaction(producer, sink, tp, 5, group)
        assert await _committed(bootstrap, group, tp) == 5

        # What a frozen worker still believes when it wakes: its old generation and id.
        stale = group_metadata(first)()
        await first.stop()  # it leaves; another member takes the partition
        second = await _group_member(bootstrap, source, group)
        try:
            fence_by_generation(producer, lambda: stale)
            with pytest.raises(GroupFencedError, match=rf"{source}\[0\]"):
                await _commit_in_transaction(producer, sink, tp, 9, group)
            assert await _committed(bootstrap, group, tp) == 5  # nothing moved
            # The refused transaction was aborted: a read_committed reader sees one output.
            reader = AIOKafkaConsumer(
                bootstrap_servers=bootstrap,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
            )
            await reader.start()
            try:
                out = TopicPartition(sink, 0)
                reader.assign([out])
                seen = []
                for _ in range(20):
                    batch = await reader.getmany(out, timeout_ms=200)
                    seen.extend(batch.get(out, []))
                assert [r.value for r in seen] == [b"output"]
            finally:
                await reader.stop()
            # The producer is usable again, for the current member.
            fence_by_generation(producer, group_metadata(second))
            await _commit_in_transaction(producer, sink, tp, 9, group)
            assert await _committed(bootstrap, group, tp) == 9
        finally:
            await second.stop()
    finally:
        await producer.stop()
