"""Session-wide fixtures: the real Redis, and (later) the bundled Kafka-protocol broker."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.kafka_fixtures import (  # noqa: F401  (fixtures, re-exported for every test)
    apache_kafka,
    bundled_broker,
    kafka_broker,
    make_settings,
    poisoned_model,
    second_model,
    served_model,
    small_transactions,
)
from tests.redis_cluster import redis_cluster_fixture  # noqa: F401  (one cluster a session)

REDIS_URL = os.environ.get("FRAUDSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the real Redis; the test's keys are deleted afterwards."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - the environment is broken, say so loudly
        pytest.fail(f"the real Redis at {REDIS_URL} is not reachable: {exc}")
    yield client
    async for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()
