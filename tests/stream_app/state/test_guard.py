"""The state marker's checks against the real Redis: every way state can be lost is told
apart from a healthy state, and a rebuild ends the loss.

The end-to-end path (a real worker, FLUSHALL, ``fraudstream rebuild-state``) is
``tests/stream_app/state/test_loss.py``; here each
detection the worker cannot be driven into cheaply:
a failover to a replica that missed writes (the counter goes back), another state than the
one the worker wrote (another epoch, not a rebuild), an upgrade (state written before
markers existed is adopted, not reported lost), ``rebuild-state --accept-as-is``, and the
same on a Redis Cluster (the session's, 3 primaries and 3 replicas).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster

from stream_app.metrics import WorkerMetrics
from stream_app.state.guard import StateGuard, Updates, rebuild_state, write_marker
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import TransactionUpdate
from tests.cleanup import issue_prefix
from tests.conftest import REDIS_URL
from tests.resilience_helpers import environment_without_settings
from training.ops.services.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.integration


def _guard(client: aioredis.Redis, prefix: str) -> tuple[StateGuard, WorkerMetrics]:
    metrics = WorkerMetrics(CollectorRegistry(), process_collectors=False)
    metrics.ready.set(1)
    return StateGuard(RedisStateStore(client, prefix=prefix), metrics), metrics


def _lost(metrics: WorkerMetrics) -> tuple[float, float]:
    return metrics.state_lost._value.get(), metrics.ready.gauge._value.get()


async def test_a_fresh_deployment_creates_the_marker_and_stays_healthy(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    guard, metrics = _guard(redis_client, redis_prefix)
    await guard.start(state_expected=False)
    for _ in range(3):
        await guard.check()
    assert guard.lost is None and _lost(metrics) == (0, 1)
    assert await redis_client.ttl(guard.key) == -1  # no TTL: never expires nor evicted by TTL


async def test_a_counter_gone_back_is_a_stale_replica(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    guard, metrics = _guard(redis_client, redis_prefix)
    await guard.start(state_expected=False)
    for _ in range(3):
        await guard.check()  # writes: 1, 2, 3
    # A failover that lost only the last increment (not replicated yet) is no loss.
    await redis_client.hset(guard.key, "writes", 2)
    await guard.check()  # 3: as high as seen before
    assert guard.lost is None
    # What a replica that missed writes holds: the same epoch, an older counter.
    await redis_client.hset(guard.key, "writes", 1)
    await guard.check()  # 2 < 3
    assert guard.lost is not None and "went back" in guard.lost
    assert _lost(metrics) == (1, 0)
    metrics.ready.set(1)  # a loop going on after a retry does not hide the loss
    assert _lost(metrics) == (1, 0)


async def test_another_epoch_without_a_rebuild_is_another_state(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    guard, metrics = _guard(redis_client, redis_prefix)
    await guard.start(state_expected=False)
    await write_marker(redis_client, guard.key, "worker")  # another deployment's fresh start
    await guard.check()
    assert guard.lost is not None and "changed epoch" in guard.lost
    assert _lost(metrics) == (1, 0)


async def test_a_rebuild_ends_the_loss(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    guard, metrics = _guard(redis_client, redis_prefix)
    await guard.start(state_expected=False)
    await redis_client.delete(guard.key)  # FLUSHALL, as far as this prefix goes
    await guard.check()
    assert _lost(metrics) == (1, 0)
    store = RedisStateStore(redis_client, prefix=redis_prefix)
    update = TransactionUpdate("t1", "c1", "k1", 1_522_540_800_000, 12.5)
    report = await rebuild_state(store, Updates([(update.time_ms, 0, update)], [], source="x"))
    assert report.transactions == 1
    await guard.check()
    assert guard.lost is None and _lost(metrics) == (0, 1)
    assert await redis_client.exists(store.customer_key("c1"))


async def test_state_without_a_marker_is_adopted_not_lost(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # A deployment upgraded to markers: committed offsets, state keys, no marker yet.
    store = RedisStateStore(redis_client, prefix=redis_prefix)
    await store.apply_transactions([TransactionUpdate("t1", "c1", "k1", 1_522_540_800_000, 1.0)])
    guard, metrics = _guard(redis_client, redis_prefix)
    await guard.start(state_expected=True)
    assert guard.lost is None and await redis_client.exists(guard.key)
    empty, metrics = _guard(redis_client, f"{redis_prefix}-empty")
    await empty.start(state_expected=True)  # offsets committed, nothing in Redis: lost
    assert empty.lost is not None and _lost(metrics) == (1, 0)
    await redis_client.delete(empty.key)


def _cli(prefix: str, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **environment_without_settings(),
        "FRAUDSTREAM_REDIS_URL": REDIS_URL,
        "FRAUDSTREAM_STATE_KEY_PREFIX": prefix,
        "FRAUDSTREAM_MODEL_DIR": str(model),
    }
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "rebuild-state", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_accepting_the_state_as_is_ends_the_loss(
    redis_client: aioredis.Redis, redis_prefix: str, served_model: Path
) -> None:
    guard, metrics = _guard(redis_client, redis_prefix)
    await guard.start(state_expected=True)  # nothing in Redis: lost
    assert _lost(metrics) == (1, 0)
    assert _cli(redis_prefix, served_model).returncode == 2  # no source named
    done = _cli(redis_prefix, served_model, "--accept-as-is")
    assert done.returncode == 0, done.stderr
    await guard.check()
    assert guard.lost is None and _lost(metrics) == (0, 1)
    again = _cli(redis_prefix, served_model, "--accept-as-is")
    assert again.returncode == 2 and "not lost" in again.stderr  # a marker is there now


async def test_on_a_redis_cluster_the_marker_is_one_hash_tagged_key(
    redis_cluster: LocalRedisCluster,
) -> None:
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=False)
    prefix = issue_prefix()
    try:
        store = RedisStateStore(client, prefix=prefix)
        metrics = WorkerMetrics(CollectorRegistry(), process_collectors=False)
        guard = StateGuard(store, metrics)
        assert guard.key == f"{prefix}:{{marker}}"
        await guard.start(state_expected=False)
        await guard.check()
        assert guard.lost is None
        await client.delete(guard.key)  # a failover to an empty replica, for this prefix
        await guard.check()
        assert guard.lost is not None and metrics.state_lost._value.get() == 1
        update = TransactionUpdate("t1", "c1", "k1", 1_522_540_800_000, 12.5)
        await rebuild_state(store, Updates([(update.time_ms, 0, update)], [], source="x"))
        await guard.check()
        assert guard.lost is None and metrics.state_lost._value.get() == 0
        assert await client.exists(store.customer_key("c1"))
    finally:
        await client.aclose()
        redis_cluster.flush(prefix)
