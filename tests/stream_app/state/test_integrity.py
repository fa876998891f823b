"""State that hostile input cannot poison: reused transaction ids, labels that do not match
their transaction, label corrections, and corrupt keys, on the reference store, on the
real Redis and on a real Redis Cluster (one store per test, its own key prefix)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster

from stream_app import features as F
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import (
    LabelOutcome,
    LabelUpdate,
    StateStore,
    TransactionUpdate,
)
from tests.cleanup import issue_prefix
from tests.conftest import REDIS_URL
from tests.feature_cases import BASE_MS
from tests.memory_state import MemoryStateStore
from training.ops.services.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.integration

TX = TransactionUpdate("tx1", "c1", "t1", BASE_MS, 120.0)
FRAUD = LabelUpdate("tx1", "c1", "t1", BASE_MS, True, reported_ms=BASE_MS + 8 * F.MS_PER_DAY)


async def _clean(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """The reference store and the Redis stores: every test here holds for all three."""
    if request.param == "memory":
        yield MemoryStateStore(sequence_length=3)
        return
    prefix = issue_prefix()
    if request.param == "cluster":
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        cluster_client = RedisCluster.from_url(cluster.url, decode_responses=False)
        try:
            yield RedisStateStore(cluster_client, prefix=prefix, sequence_length=3)
        finally:
            await cluster_client.aclose()
            cluster.flush(prefix)
        return
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield RedisStateStore(client, prefix=prefix, sequence_length=3)
    finally:
        await _clean(client, prefix)
        await client.aclose()


async def _fraud_count(store: StateStore, terminal_id: str, time_ms: int) -> tuple[int, int]:
    """(transactions, frauds) of the terminal's hour of ``time_ms``, as stored."""
    hour = time_ms // F.MS_PER_HOUR
    if isinstance(store, MemoryStateStore):
        return store.terminal_tx[terminal_id][hour], store.terminal_fraud[terminal_id][hour]
    assert isinstance(store, RedisStateStore)
    _, _, tx, fraud = await store.terminal_counts(terminal_id, hour)
    return tx, fraud


# Conflicting duplicates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 9_999.0},
        {"time_ms": BASE_MS + 1},
        {"terminal_id": "t2"},
        {"customer_id": "c2"},
    ],
    ids=["amount", "time", "terminal", "customer"],
)
async def test_a_reused_id_is_a_conflict_not_the_first_score(
    store: StateStore, change: dict[str, Any]
) -> None:
    if change.get("customer_id") and isinstance(store, RedisStateStore) and store.clustered:
        pytest.skip("a cluster's ledger is per customer shard: see redis_cluster_state")
    first = await store.apply_transactions([TX])
    reused = TX._replace(**change)
    state = await store.apply_transactions([reused, TX])
    assert state.conflicts.tolist() == [True, False]
    assert state.duplicate.tolist() == [False, True]
    # The true redelivery still gets its first inputs; the conflict changed nothing.
    np.testing.assert_array_equal(state.history.times_ms[state.history.group == 1], [BASE_MS])
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 0)
    assert await _fraud_count(store, "t2", BASE_MS) == (0, 0)
    again = await store.apply_transactions([TX])
    np.testing.assert_array_equal(again.history.amounts, first.history.amounts)


async def test_conflicts_within_one_batch(store: StateStore) -> None:
    state = await store.apply_transactions([TX, TX._replace(amount=1.0), TX])
    assert state.conflicts.tolist() == [False, True, False]
    assert state.duplicate.tolist() == [False, False, True]


# Labels reconciled with transactions ---------------------------------------------------------


async def test_a_label_for_an_unknown_transaction_waits_then_counts(store: StateStore) -> None:
    assert await store.apply_labels([FRAUD]) == [LabelOutcome.PENDING]
    assert await _fraud_count(store, "t1", BASE_MS) == (0, 0)
    state = await store.apply_transactions([TX])
    assert state.labels_applied == (LabelOutcome.FRAUD,)
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 1)
    assert await store.apply_labels([FRAUD]) == [LabelOutcome.DUPLICATE]
    assert await store.expired_labels(10) == []


@pytest.mark.parametrize(
    "change",
    [{"customer_id": "c2"}, {"terminal_id": "t2"}, {"time_ms": BASE_MS + 1}],
    ids=["customer", "terminal", "time"],
)
async def test_a_label_naming_another_transaction_is_refused(
    store: StateStore, change: dict[str, Any]
) -> None:
    await store.apply_transactions([TX])
    [outcome] = await store.apply_labels([FRAUD._replace(**change)])
    if "customer_id" in change and isinstance(store, RedisStateStore) and store.clustered:
        # Looked up in the other customer's shard: unknown there, it waits (then expires).
        assert outcome in (LabelOutcome.MISMATCH, LabelOutcome.PENDING)
    else:
        assert outcome is LabelOutcome.MISMATCH
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 0)
    assert await _fraud_count(store, "t2", BASE_MS) == (0, 0)


async def test_corrections_follow_the_latest_verdict(store: StateStore) -> None:
    await store.apply_transactions([TX])
    day = F.MS_PER_DAY
    genuine = FRAUD._replace(is_fraud=False, reported_ms=BASE_MS + 9 * day)
    stale_fraud = FRAUD._replace(reported_ms=BASE_MS + 8 * day)
    fraud_again = FRAUD._replace(reported_ms=BASE_MS + 10 * day)
    assert await store.apply_labels([FRAUD]) == [LabelOutcome.FRAUD]
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 1)
    assert await store.apply_labels([genuine]) == [LabelOutcome.CORRECTED]
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 0)
    assert await store.apply_labels([stale_fraud]) == [LabelOutcome.STALE]
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 0)
    assert await store.apply_labels([fraud_again, fraud_again]) == [
        LabelOutcome.CORRECTED,
        LabelOutcome.DUPLICATE,
    ]
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 1)


async def test_a_genuine_first_verdict_does_not_block_a_later_fraud(store: StateStore) -> None:
    await store.apply_transactions([TX])
    genuine = FRAUD._replace(is_fraud=False, reported_ms=BASE_MS + 1)
    assert await store.apply_labels([genuine]) == [LabelOutcome.GENUINE]
    assert await store.apply_labels([FRAUD]) == [LabelOutcome.CORRECTED]
    assert await _fraud_count(store, "t1", BASE_MS) == (1, 1)


async def test_pending_labels_expire_with_their_source(store: StateStore) -> None:
    if isinstance(store, MemoryStateStore):
        store.label_wait_s = 0.0
    else:
        assert isinstance(store, RedisStateStore)
        store.set_label_wait(0.0)
    source = b"\x00the message as it came\xff"
    assert await store.apply_labels([FRAUD._replace(source=source)]) == [LabelOutcome.PENDING]
    await asyncio.sleep(0.01)
    expired = await store.expired_labels(10)
    assert [(e.transaction_id, e.source) for e in expired] == [("tx1", source)]
    await store.drop_pending(expired)
    assert await store.expired_labels(10) == []
    # Dropped: the transaction's arrival applies nothing.
    assert (await store.apply_transactions([TX])).labels_applied == ()


# A terminal never has more frauds than transactions ---------------------------------------

_label_events = st.lists(
    st.tuples(
        st.integers(0, 7),  # transaction
        st.booleans(),  # verdict
        st.integers(0, 5),  # reported_at, in days after the transaction
        st.sampled_from(["same", "same", "same", "customer", "terminal", "time"]),
    ),
    max_size=40,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.permutations(range(8)),
    labels=_label_events,
    cut=st.integers(0, 40),
)
def test_terminal_frauds_never_exceed_transactions(
    arrivals: list[int], labels: list[tuple[int, bool, int, str]], cut: int
) -> None:
    """Whatever labels arrive, in whatever order, before or after their transactions: in
    every hour of every terminal, frauds <= transactions, and the frauds are exactly the
    transactions whose latest verdict is fraud (on both stores)."""
    txs = [
        TransactionUpdate(f"tx{i}", f"c{i % 3}", f"t{i % 2}", BASE_MS + (i % 4) * 1000, 10.0 + i)
        for i in range(8)
    ]

    def label_of(event: tuple[int, bool, int, str]) -> LabelUpdate:
        i, verdict, reported, change = event
        tx = txs[i]
        label = LabelUpdate(
            tx.transaction_id,
            tx.customer_id,
            tx.terminal_id,
            tx.time_ms,
            verdict,
            reported_ms=tx.time_ms + reported * F.MS_PER_DAY,
        )
        if change == "customer":
            return label._replace(customer_id="other")
        if change == "terminal":
            return label._replace(terminal_id="t9")
        if change == "time":
            return label._replace(time_ms=tx.time_ms + 1)
        return label

    async def run(store: StateStore) -> list[tuple[int, int]]:
        stream: list[Callable[[], Any]] = []
        ordered = [txs[i] for i in arrivals]
        for k, event in enumerate(labels):
            stream.append(functools.partial(store.apply_labels, [label_of(event)]))
            if k == cut:
                stream.append(lambda: store.apply_transactions(ordered[:4]))
        stream.insert(min(cut, len(stream)), lambda: store.apply_transactions(ordered[4:]))
        stream.append(lambda: store.apply_transactions(ordered))
        for step in stream:
            await step()
        return [await _fraud_count(store, f"t{t}", BASE_MS) for t in range(2)]

    # Expected: per terminal, transactions whose latest matching verdict is fraud.
    latest: dict[int, tuple[int, bool]] = {}
    for event in labels:
        i, verdict, reported, change = event
        if change != "same":
            continue
        if i not in latest or reported >= latest[i][0]:
            latest[i] = (reported, verdict)
    want = [(4, sum(1 for i, (_, v) in latest.items() if v and i % 2 == t)) for t in range(2)]

    async def both() -> None:
        memory = await run(MemoryStateStore(sequence_length=3))
        prefix = issue_prefix()
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            in_redis = await run(RedisStateStore(client, prefix=prefix, sequence_length=3))
        finally:
            await _clean(client, prefix)
            await client.aclose()
        for tx_count, frauds in memory + in_redis:
            assert frauds <= tx_count
        assert memory == want
        assert in_redis == want

    asyncio.run(both())


# Corrupt state never stops the worker -------------------------------------------------------


@pytest.mark.parametrize(
    "corrupt",
    ["customer_short", "customer_hash", "terminal_short", "terminal_hash", "ledger_list"],
)
async def test_a_corrupt_key_is_quarantined_and_the_batch_goes_on(
    redis_client: aioredis.Redis, redis_prefix: str, corrupt: str
) -> None:
    quarantined: list[str] = []
    store = RedisStateStore(
        redis_client, prefix=redis_prefix, sequence_length=3, on_quarantine=quarantined.append
    )
    other = TransactionUpdate("tx9", "c9", "t9", BASE_MS, 50.0)
    await store.apply_transactions([TX._replace(transaction_id="tx0", time_ms=BASE_MS - 1000)])
    key = {
        "customer_short": store.customer_key("c1"),
        "customer_hash": store.customer_key("c1"),
        "terminal_short": store.terminal_key("t1"),
        "terminal_hash": store.terminal_key("t1"),
        "ledger_list": store.ledger_key("tx1"),
    }[corrupt]
    await redis_client.delete(key)
    if corrupt.endswith("short"):
        await redis_client.set(key, b"x" * 50)
    elif corrupt.endswith("hash"):
        await redis_client.hset(key, "field", "value")
    else:
        await redis_client.rpush(key, "a", "b")
    state = await store.apply_transactions([TX, other])
    assert quarantined == [key]
    assert state.resets.tolist() == [True, False]
    assert not state.conflicts.any()
    assert await redis_client.exists(f"{key}:quarantined") == 1
    # Scored from empty state: the event's own row only when its history was lost.
    if corrupt.startswith("customer"):
        assert (state.history.group == 0).sum() == 1
    # The next batch finds sound state again.
    later = await store.apply_transactions([TX._replace(transaction_id="tx2", time_ms=BASE_MS + 5)])
    assert later.resets.tolist() == [False]
    assert quarantined == [key]


async def test_a_corrupt_key_found_by_a_label_is_quarantined(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    quarantined: list[str] = []
    store = RedisStateStore(redis_client, prefix=redis_prefix, on_quarantine=quarantined.append)
    await store.apply_transactions([TX])
    await redis_client.delete(store.terminal_key("t1"))
    await redis_client.hset(store.terminal_key("t1"), "field", "value")
    assert await store.apply_labels([FRAUD]) == [LabelOutcome.FRAUD]
    assert quarantined == [store.terminal_key("t1")]
