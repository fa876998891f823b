"""The Redis state store against the real Redis: same results as the reference store."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_app import features as F
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import LabelOutcome, LabelUpdate, TransactionUpdate
from tests.cleanup import issue_prefix
from tests.conftest import REDIS_URL
from tests.feature_cases import BASE_MS, Tx, replay_online, run_offline, transactions
from tests.memory_state import MemoryStateStore

pytestmark = pytest.mark.integration


async def _replay_in_redis(
    txs: list[Tx], batch_sizes: list[int], sequence_length: int
) -> tuple[np.ndarray, np.ndarray]:
    prefix = issue_prefix()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        store = RedisStateStore(client, prefix=prefix, sequence_length=sequence_length)
        return await replay_online(store, txs, batch_sizes, sequence_length)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    txs=transactions,
    batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    sequence_length=st.integers(1, 6),
)
def test_redis_store_equals_offline(
    txs: list[Tx], batch_sizes: list[int], sequence_length: int
) -> None:
    online_f, online_s = asyncio.run(_replay_in_redis(txs, batch_sizes, sequence_length))
    offline_f, offline_s = run_offline(txs, sequence_length)
    np.testing.assert_allclose(online_f, offline_f, rtol=0, atol=1e-6)
    np.testing.assert_allclose(online_s, offline_s, rtol=0, atol=1e-6)


def _random_updates(n: int, seed: int) -> list[TransactionUpdate]:
    rng = np.random.default_rng(seed)
    times = BASE_MS + np.sort(rng.integers(0, 50 * F.MS_PER_DAY, n))
    return [
        TransactionUpdate(
            f"tx{i}",
            f"c{rng.integers(0, 20)}",
            f"t{rng.integers(0, 10)}",
            int(times[i]),
            float(np.round(rng.uniform(0, 300), 2)),
        )
        for i in range(n)
    ]


async def test_redis_store_matches_the_reference_store_batch_for_batch(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    updates = _random_updates(600, seed=3)
    labels = [
        LabelUpdate(u.transaction_id, u.customer_id, u.terminal_id, u.time_ms, i % 9 == 0)
        for i, u in enumerate(updates)
    ]
    redis_store = RedisStateStore(redis_client, prefix=redis_prefix, sequence_length=4)
    memory_store = MemoryStateStore(sequence_length=4)
    for start in range(0, len(updates), 50):
        batch = updates[start : start + 50]
        # Labels of transactions older than a week arrive before each batch.
        known = [lb for lb in labels[:start] if lb.time_ms < batch[0].time_ms - 7 * F.MS_PER_DAY]
        assert await redis_store.apply_labels(known) == await memory_store.apply_labels(known)
        got = await redis_store.apply_transactions(batch)
        want = await memory_store.apply_transactions(batch)
        for name in ("group", "times_ms", "amounts", "terminal_tx", "terminal_fraud"):
            np.testing.assert_array_equal(getattr(got.history, name), getattr(want.history, name))
        np.testing.assert_array_equal(got.duplicate, want.duplicate)
    risk = F.FEATURE_INDEX["TERMINAL_ID_RISK_30DAY_WINDOW"]
    final, _ = F.online_features(got.history, 4)
    assert (final[:, risk] > 0).any(), "labels should have reached the terminal risk"


async def test_state_survives_a_new_store_and_sets_ttls(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    updates = _random_updates(30, seed=5)
    first = RedisStateStore(redis_client, prefix=redis_prefix, sequence_length=3, ttl_s=3600)
    state = await first.apply_transactions(updates)
    # A restarted worker (a new store object) sees every event as already applied.
    second = RedisStateStore(redis_client, prefix=redis_prefix, sequence_length=3, ttl_s=3600)
    again = await second.apply_transactions(updates)
    assert again.duplicate.all()
    f1, s1 = F.online_features(state.history, 3)
    f2, s2 = F.online_features(again.history, 3)
    # Only the events still among their customer's last 3 are guaranteed identical inputs.
    np.testing.assert_array_equal(f1[-1], f2[-1])
    np.testing.assert_array_equal(s1[-1], s2[-1])
    ttl = await redis_client.pttl(first.customer_key(updates[0].customer_id))
    assert 0 < ttl <= 3_600_000
    ttl = await redis_client.pttl(first.terminal_key(updates[0].terminal_id))
    assert 0 < ttl <= 3_600_000


async def test_a_label_counts_once(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    store = RedisStateStore(redis_client, prefix=redis_prefix)
    hour = BASE_MS // F.MS_PER_HOUR + 5
    await store.apply_transactions(
        [
            TransactionUpdate("tx1", "c1", "t1", BASE_MS, 5.0),
            TransactionUpdate("tx0", "c1", "t1", hour * F.MS_PER_HOUR, 5.0),
        ]
    )
    label = LabelUpdate("tx1", "c1", "t1", BASE_MS, True)
    assert await store.apply_labels([label, label]) == [LabelOutcome.FRAUD, LabelOutcome.DUPLICATE]
    assert await store.apply_labels([label]) == [LabelOutcome.DUPLICATE]
    assert await store.apply_labels(
        [label._replace(transaction_id="tx0", time_ms=hour * F.MS_PER_HOUR)]
    ) == [LabelOutcome.FRAUD]
    assert await store.terminal_counts("t1", hour - 5) == (2, 2, 1, 1)
    assert await store.terminal_counts("t1", hour) == (2, 2, 1, 1)
    # A day a ring later replaces the day's slot.
    later = BASE_MS + 64 * F.MS_PER_DAY
    await store.apply_transactions([TransactionUpdate("tx2", "c1", "t1", later, 5.0)])
    assert await store.terminal_counts("t1", hour - 5) == (0, 0, 0, 0)
    assert await store.terminal_counts("t1", hour - 5 + 64 * 24) == (1, 0, 1, 0)
    assert await store.terminal_counts("t1", hour + 64 * 24) == (1, 0, 0, 0)


async def test_terminal_counters_of_feature_version_1_are_not_read(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisStateStore(redis_client, prefix=redis_prefix)
    # A day-only ring as version 1 of the features kept it: 64 slots of (day, tx, frauds).
    day = BASE_MS // F.MS_PER_DAY
    old = np.zeros(64, dtype=[("day", "<i4"), ("tx", "<i4"), ("fraud", "<i4")])
    old[day % 64] = (day, 50, 50)
    await redis_client.set(f"{redis_prefix}:t:t1", old.tobytes())
    assert store.terminal_key("t1") != f"{redis_prefix}:t:t1"
    state = await store.apply_transactions(
        [TransactionUpdate("tx1", "c1", "t1", BASE_MS + 8 * F.MS_PER_DAY, 5.0)]
    )
    assert state.history.terminal_tx.tolist() == [[0, 0, 0]]
    assert await store.terminal_counts("t1", (BASE_MS + 8 * F.MS_PER_DAY) // F.MS_PER_HOUR) == (
        1,
        0,
        1,
        0,
    )
