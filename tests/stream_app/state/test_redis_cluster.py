"""State on a real Redis Cluster (3 primaries, 3 replicas): the same features as on one Redis.

The store's checks of ``tests/stream_app/state/test_redis.py`` run here against the
cluster: online ==
offline features for random histories, and batch for batch the reference store's results.
Then the protocol that splits a batch into per-slot calls is broken where it could lose or
double a count (a worker dying between the customer and the terminal step, an outbox sent
twice), and the real worker runs on the cluster: its scores equal ``score-file``, and with a
primary SIGKILLed mid-replay (its replica takes over) nothing is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster

from stream_app import features as F
from stream_app.config import Settings, load_settings
from stream_app.errors import ConfigError
from stream_app.models.scorer import OnnxScorer
from stream_app.records import parse_label
from stream_app.state.redis import RedisStateStore
from stream_app.state.redis_cluster import _Found
from stream_app.state.store import (
    ENTRY_DTYPE,
    LabelOutcome,
    LabelUpdate,
    TransactionUpdate,
)
from stream_app.worker.runtime import check_redis_mode, redis_client
from tests.cleanup import issue_prefix
from tests.feature_cases import BASE_MS, Tx, replay_online, run_offline, transactions
from tests.kafka_fixtures import REDIS_URL, Broker, Dataset, new_settings, read_topic
from tests.memory_state import MemoryStateStore
from tests.model_fixtures import TEST_SEQUENCE_LENGTH
from tests.resilience_helpers import run_worker_to_exit, simulated
from tests.stream_app.state.test_redis import _random_updates
from tests.stream_app.worker.test_replay import (
    LABELS_DELAY,
    RATE,
    probe_labels,
    publish,
    scores_by_id,
    stream,
)
from training.ops.replay import replay_order
from training.ops.services.redis_cluster import LocalRedisCluster
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table
from training.transactions import to_arrays

pytestmark = pytest.mark.integration

# What the features read; the protocol's own keys (outbox, batch numbers, counted batches,
# fences) and the label markers are bookkeeping that differs between runs.
STATE_KEYS = (":c:", ":t2:")


def _client(cluster: LocalRedisCluster) -> RedisCluster:
    return RedisCluster.from_url(cluster.url, decode_responses=False)


@pytest.fixture
async def cluster_store(
    redis_cluster: LocalRedisCluster,
) -> AsyncIterator[RedisStateStore]:
    """A store on the cluster under a prefix of its own (keys deleted afterwards)."""
    prefix = issue_prefix()
    client = _client(redis_cluster)
    try:
        yield RedisStateStore(client, prefix=prefix, sequence_length=4)
    finally:
        await client.aclose()
        redis_cluster.flush(prefix)


async def _replay_on_cluster(
    url: str, prefix: str, txs: list[Tx], batch_sizes: list[int], sequence_length: int
) -> tuple[np.ndarray, np.ndarray]:
    client = RedisCluster.from_url(url, decode_responses=False)
    try:
        store = RedisStateStore(client, prefix=prefix, sequence_length=sequence_length)
        return await replay_online(store, txs, batch_sizes, sequence_length)
    finally:
        await client.aclose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    txs=transactions,
    batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    sequence_length=st.integers(1, 6),
)
def test_cluster_store_equals_offline(
    redis_cluster: LocalRedisCluster, txs: list[Tx], batch_sizes: list[int], sequence_length: int
) -> None:
    prefix = issue_prefix()
    try:
        online_f, online_s = asyncio.run(
            _replay_on_cluster(redis_cluster.url, prefix, txs, batch_sizes, sequence_length)
        )
    finally:
        redis_cluster.flush(prefix)
    offline_f, offline_s = run_offline(txs, sequence_length)
    np.testing.assert_allclose(online_f, offline_f, rtol=0, atol=1e-6)
    np.testing.assert_allclose(online_s, offline_s, rtol=0, atol=1e-6)


async def test_cluster_store_matches_the_reference_store_batch_for_batch(
    cluster_store: RedisStateStore, redis_cluster: LocalRedisCluster
) -> None:
    updates = _random_updates(600, seed=3)
    labels = [
        LabelUpdate(u.transaction_id, u.customer_id, u.terminal_id, u.time_ms, i % 9 == 0)
        for i, u in enumerate(updates)
    ]
    memory_store = MemoryStateStore(sequence_length=4)
    for start in range(0, len(updates), 50):
        batch = updates[start : start + 50]
        # Labels of transactions older than a week arrive before each batch.
        known = [lb for lb in labels[:start] if lb.time_ms < batch[0].time_ms - 7 * F.MS_PER_DAY]
        assert await cluster_store.apply_labels(known) == await memory_store.apply_labels(known)
        got = await cluster_store.apply_transactions(batch)
        want = await memory_store.apply_transactions(batch)
        for name in ("group", "times_ms", "amounts", "terminal_tx", "terminal_fraud"):
            np.testing.assert_array_equal(getattr(got.history, name), getattr(want.history, name))
        np.testing.assert_array_equal(got.duplicate, want.duplicate)
    # A batch of 50 events spans days of this data: cut where a window could read an
    # hour counted earlier in the same call.
    assert cluster_store._cluster is not None
    assert len(cluster_store._cluster.parts(updates)) > 1
    again = await cluster_store.apply_transactions(updates[-50:])
    assert again.duplicate.all()
    risk = F.FEATURE_INDEX["TERMINAL_ID_RISK_30DAY_WINDOW"]
    final, _ = F.online_features(got.history, 4)
    assert (final[:, risk] > 0).any(), "labels should have reached the terminal risk"
    # The shards spread the state over every primary.
    state = redis_cluster.state(cluster_store.prefix)
    per_primary = redis_cluster.keys_per_primary(cluster_store.prefix)
    assert len(per_primary) == 3 and min(per_primary.values()) > 0, per_primary
    assert sum(":c:" in k for k in state) == 20 and sum(":t2:" in k for k in state) == 10


async def test_terminal_counts_and_labels_on_the_cluster(cluster_store: RedisStateStore) -> None:
    label = LabelUpdate("tx1", "c1", "t1", BASE_MS, True, reported_ms=BASE_MS + 1)
    # Before its transaction, a label waits for it (in the customer's shard).
    assert await cluster_store.apply_labels([label, label]) == [
        LabelOutcome.PENDING,
        LabelOutcome.PENDING,
    ]
    state = await cluster_store.apply_transactions(
        [TransactionUpdate("tx1", "c1", "t1", BASE_MS, 5.0)]
    )
    assert state.labels_applied == (LabelOutcome.FRAUD,)
    hour = BASE_MS // F.MS_PER_HOUR
    assert await cluster_store.terminal_counts("t1", hour) == (1, 1, 1, 1)
    assert await cluster_store.apply_labels([label]) == [LabelOutcome.DUPLICATE]
    genuine = label._replace(is_fraud=False, reported_ms=BASE_MS + 2)
    assert await cluster_store.apply_labels([genuine]) == [LabelOutcome.CORRECTED]
    assert await cluster_store.terminal_counts("t1", hour) == (1, 0, 1, 0)
    ttl = await cluster_store.client.pttl(cluster_store.customer_key("c1"))
    assert 0 < ttl <= cluster_store.ttl_ms


async def test_a_worker_dying_between_a_label_and_its_terminal_counts_it_once(
    cluster_store: RedisStateStore,
) -> None:
    """A verdict recorded in the customer's shard whose terminal step never ran: it stays
    in the shard's outbox, and the next call on that shard counts it, once."""
    cluster = cluster_store._cluster
    assert cluster is not None
    tx = TransactionUpdate("tx1", "c1", "t1", BASE_MS, 5.0)
    await cluster_store.apply_transactions([tx])
    label = LabelUpdate("tx1", "c1", "t1", BASE_MS, True, reported_ms=BASE_MS + 1)
    outcomes, outboxes = await cluster.label_step([label])  # then the worker dies
    assert outcomes == [LabelOutcome.FRAUD]
    hour = BASE_MS // F.MS_PER_HOUR
    assert await cluster_store.terminal_counts("t1", hour) == (1, 0, 1, 0)
    # A redelivered label is a duplicate, and its call sends the outbox still holding it.
    assert await cluster_store.apply_labels([label]) == [LabelOutcome.DUPLICATE]
    assert await cluster_store.terminal_counts("t1", hour) == (1, 1, 1, 1)
    # The dead worker's step 3, arriving late, counts nothing twice.
    await cluster.count_outboxes(outboxes)
    assert await cluster_store.terminal_counts("t1", hour) == (1, 1, 1, 1)


def _state(cluster: LocalRedisCluster, prefix: str) -> dict[str, object]:
    return {k: v for k, v in cluster.state(prefix).items() if any(s in k for s in STATE_KEYS)}


async def test_a_worker_dying_between_the_customer_and_terminal_steps_counts_once(
    redis_cluster: LocalRedisCluster,
) -> None:
    """The split's failure points, driven step by step: the steps are the store's own."""
    updates = _random_updates(400, seed=11)
    batches = [updates[s : s + 40] for s in range(0, len(updates), 40)]
    reference, broken = issue_prefix(), issue_prefix()
    client = _client(redis_cluster)
    try:
        store = RedisStateStore(client, prefix=reference, sequence_length=4)
        for batch in batches:
            await store.apply_transactions(batch)

        first = RedisStateStore(client, prefix=broken, sequence_length=4)
        for batch in batches[:3]:
            await first.apply_transactions(batch)
        # Batch 3: steps 1 and 2, then the worker dies before step 3.
        crashed = first._cluster
        assert crashed is not None
        batch = batches[3]
        everyone = list(range(len(batch)))
        encoded = crashed._encode(batch)
        counts = await crashed._terminal_step(batch, encoded, {}, everyone)
        stored, new, flags = [b""] * len(batch), [b""] * len(batch), bytearray(len(batch))
        outboxes = await crashed._customer_step(
            batch, encoded, everyone, counts, stored, new, flags, bytearray(len(batch)), _Found()
        )
        assert set(flags) == {ord("0")}  # every event new
        # A new worker gets batch 3 again: every event a duplicate with its first inputs,
        # and the increments still in the outboxes counted now.
        second = RedisStateStore(client, prefix=broken, sequence_length=4)
        again = await second.apply_transactions(batch)
        assert again.duplicate.all()
        first_inputs = np.frombuffer(
            b"".join(s + n for s, n in zip(stored, new, strict=True)), ENTRY_DTYPE
        )
        np.testing.assert_array_equal(again.history.times_ms, first_inputs["time_ms"])
        np.testing.assert_array_equal(again.history.terminal_tx, first_inputs["terminal_tx"])
        np.testing.assert_array_equal(again.history.terminal_fraud, first_inputs["terminal_fraud"])
        # The old worker's step 3 arrives late (or a third worker flushes the same
        # outboxes): every increment there was counted already, nothing changes.
        increments, _ = crashed._increments(outboxes)
        before = _state(redis_cluster, broken)
        await crashed._terminal_step(batch, encoded, increments, [])
        assert _state(redis_cluster, broken) == before
        for batch in batches[4:]:
            await second.apply_transactions(batch)
        assert _state(redis_cluster, broken) == _state(redis_cluster, reference)
    finally:
        await client.aclose()
        redis_cluster.flush(reference)
        redis_cluster.flush(broken)


async def test_the_cluster_setting_must_match_the_server(redis_cluster: LocalRedisCluster) -> None:
    as_cluster = Settings(redis_url=REDIS_URL, redis_cluster=True)
    client = redis_client(as_cluster)
    try:
        with pytest.raises(ConfigError, match="FRAUDSTREAM_REDIS_CLUSTER=false"):
            await check_redis_mode(client, as_cluster)
    finally:
        await client.aclose()
    single = Settings(redis_url=redis_cluster.url)
    plain = redis_client(single)
    try:
        with pytest.raises(ConfigError, match="FRAUDSTREAM_REDIS_CLUSTER=true"):
            await check_redis_mode(plain, single)
    finally:
        await plain.aclose()
    right = Settings(redis_url=redis_cluster.url, redis_cluster=True)
    ok = redis_client(right)
    try:
        await check_redis_mode(ok, right)
        assert isinstance(ok, RedisCluster)
    finally:
        await ok.aclose()
    # One replica per primary: asking WAIT for two could never succeed.
    greedy = Settings(
        redis_url=redis_cluster.url, redis_cluster=True, redis_cluster_wait_replicas=2
    )
    client = redis_client(greedy)
    try:
        with pytest.raises(ConfigError, match="FRAUDSTREAM_REDIS_CLUSTER_WAIT_REPLICAS=2"):
            await check_redis_mode(client, greedy)
    finally:
        await client.aclose()


def test_a_cluster_needs_a_network_url() -> None:
    with pytest.raises(ConfigError, match="FRAUDSTREAM_REDIS_CLUSTER=true needs a redis://"):
        load_settings(redis_url="unix:///run/redis.sock", redis_cluster=True)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", [True, False], ids=["cluster-setting", "single-setting"])
def test_the_worker_refuses_a_redis_of_the_other_mode_at_start_up(
    bundled_broker: Broker, redis_cluster: LocalRedisCluster, served_model: Path, cluster: bool
) -> None:
    """Set for a cluster and given one Redis, or the reverse: exit 2 within seconds, naming
    the setting, rather than retrying what no retry can fix."""
    url = REDIS_URL if cluster else redis_cluster.url
    settings = new_settings(
        bundled_broker, model_dir=served_model, redis_url=url, redis_cluster=cluster
    )
    started = time.monotonic()
    code, output = run_worker_to_exit(settings, timeout_s=60)
    assert code == 2, output[-3000:]
    assert f"FRAUDSTREAM_REDIS_CLUSTER={'false' if cluster else 'true'}" in output
    assert "Traceback" not in output
    assert time.monotonic() - started < 60


# What the cluster buys ----------------------------------------------------------------


def _node_counters(ports: list[int]) -> dict[int, tuple[float, int, int]]:
    """Per node: CPU seconds, and the EVALSHA calls and microseconds it has served."""
    out = {}
    for port in ports:
        with redis.Redis(host="127.0.0.1", port=port) as client:
            cpu = client.info("cpu")
            script = client.info("commandstats").get("cmdstat_evalsha", {})
        out[port] = (
            cpu["used_cpu_user"] + cpu["used_cpu_sys"],
            int(script.get("calls", 0)),
            int(script.get("usec", 0)),
        )
    return out


async def _replay_state(
    client: aioredis.Redis | RedisCluster, updates: list[TransactionUpdate]
) -> None:
    store = RedisStateStore(client, prefix=issue_prefix(), sequence_length=5)
    try:
        for start in range(0, len(updates), 500):
            await store.apply_transactions(updates[start : start + 500])
    finally:
        await client.aclose()


@pytest.mark.slow
def test_each_primary_spends_less_state_cpu_an_event_than_one_redis(
    redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    """The point of the cluster: the same replay (batches of 500, the state calls only) on a
    Redis of its own (AOF, appendfsync always, as the cluster's nodes) and on the cluster.
    The cluster's primaries spend more CPU an event in all (three rounds of calls, WAIT,
    replication to their replicas) but each well under one Redis: the state's capacity
    grows with the primaries. Prints the figures the README quotes."""
    frame = simulated(1000, 30, 3)
    arrays = to_arrays(frame)
    updates = [
        TransactionUpdate(
            str(arrays.transaction_ids[i]),
            str(arrays.customer_ids[i]),
            str(arrays.terminal_ids[i]),
            int(arrays.times_ms[i]),
            float(arrays.amounts[i]),
        )
        for i in replay_order(frame)
    ]
    n = len(updates)
    single = RedisServer(tmp_path / "redis").start()
    try:
        before = _node_counters([single.port])
        asyncio.run(_replay_state(aioredis.Redis(host="127.0.0.1", port=single.port), updates))
        after = _node_counters([single.port])
    finally:
        single.stop()
    one_cpu = (after[single.port][0] - before[single.port][0]) / n
    one_usec = (after[single.port][2] - before[single.port][2]) / n
    primaries = redis_cluster.primary_ports()
    replicas = [node.port for node in redis_cluster.running() if node.port not in primaries]
    before = _node_counters(primaries + replicas)
    asyncio.run(_replay_state(_client(redis_cluster), updates))
    after = _node_counters(primaries + replicas)
    cpu = {p: (after[p][0] - before[p][0]) / n for p in primaries + replicas}
    calls = sum(after[p][1] - before[p][1] for p in primaries)
    usec = sum(after[p][2] - before[p][2] for p in primaries) / n
    per_primary = [cpu[p] for p in primaries]
    print(
        f"\nstate CPU an event over {n:,} events: one Redis {1e6 * one_cpu:.1f} us "
        f"(EVALSHA {one_usec:.1f} us); cluster primaries {1e6 * sum(per_primary):.1f} us in "
        f"all, {', '.join(f'{1e6 * c:.1f}' for c in per_primary)} us each (EVALSHA "
        f"{usec:.1f} us, {calls / (n / 500):.0f} calls a batch), replicas "
        f"{1e6 * sum(cpu[p] for p in replicas):.1f} us"
    )
    assert max(per_primary) < 0.9 * one_cpu


# The worker on the cluster ------------------------------------------------------------


def cluster_settings(
    broker: Broker, cluster: LocalRedisCluster, model: Path, **overrides: object
) -> Settings:
    """Worker settings of a test on the cluster (a retry backoff short enough to see the
    worker recover within the test)."""
    return new_settings(
        broker,
        model_dir=model,
        redis_url=cluster.url,
        redis_cluster=True,
        retry_backoff_max_s=1.0,
        **overrides,
    )


@pytest.fixture(scope="module")
def reference(small_transactions: Dataset, served_model: Path) -> pd.DataFrame:
    return score_table(small_transactions.frame, OnnxScorer(served_model)).table


@pytest.mark.slow
def test_the_worker_on_a_cluster_scores_as_score_file(
    kafka_broker: Broker,
    redis_cluster: LocalRedisCluster,
    served_model: Path,
    small_transactions: Dataset,
    reference: pd.DataFrame,
    tmp_path: Path,
) -> None:
    settings = cluster_settings(kafka_broker, redis_cluster, served_model)
    frame = small_transactions.frame
    n = len(frame)
    try:
        with WorkerProcess(settings, tmp_path / "worker.log") as worker:
            worker.start()
            probe_labels(settings, worker)
            messages = stream(frame, settings, labels_delay=LABELS_DELAY)
            asyncio.run(publish(settings, messages, rate=RATE))
            records = asyncio.run(read_topic(settings, settings.topic_scores, until=n))
            worker.wait_for('fraudstream_events_total{outcome="scored"}', n)
            assert worker.metric("fraudstream_redis_errors_total") == 0, worker.log()
            assert worker.terminate() == 0, worker.log()
        scores = scores_by_id(records)
        ids = [str(t) for t in reference["TRANSACTION_ID"]]
        assert sorted(scores) == sorted(ids)
        assert all(len(copies) == 1 for copies in scores.values())
        ours = np.array([scores[t][0].score for t in ids])
        np.testing.assert_allclose(ours, reference["score"].to_numpy(), rtol=0, atol=1e-5)
        assert [scores[t][0].decision.value for t in ids] == list(reference["decision"])
    finally:
        redis_cluster.flush(settings.state_key_prefix)


def uninterrupted_cluster_state(
    cluster: LocalRedisCluster,
    prefix: str,
    frame: pd.DataFrame,
    label_values: list[bytes],
    sequence_length: int,
) -> dict[str, object]:
    """The labels, then the transactions in event-time order, applied without a failure."""
    labels = []
    for value in label_values:
        label = parse_label(value)
        labels.append(
            LabelUpdate(
                label.transaction_id,
                label.customer_id,
                label.terminal_id,
                int(label.event_time.timestamp() * 1000),
                label.is_fraud,
            )
        )
    arrays = to_arrays(frame)
    updates = [
        TransactionUpdate(
            str(arrays.transaction_ids[i]),
            str(arrays.customer_ids[i]),
            str(arrays.terminal_ids[i]),
            int(arrays.times_ms[i]),
            float(arrays.amounts[i]),
        )
        for i in replay_order(frame)
    ]

    async def apply() -> None:
        client = _client(cluster)
        try:
            store = RedisStateStore(client, prefix=prefix, sequence_length=sequence_length)
            await store.apply_labels(labels)
            for start in range(0, len(updates), 100):
                await store.apply_transactions(updates[start : start + 100])
        finally:
            await client.aclose()

    asyncio.run(apply())
    return _state(cluster, prefix)


@pytest.mark.slow
@pytest.mark.resilience
def test_a_primary_killed_mid_replay_loses_nothing_and_counts_nothing_twice(
    apache_kafka: Broker,
    redis_cluster: LocalRedisCluster,
    served_model: Path,
    small_transactions: Dataset,
    reference: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """On Apache Kafka (exactly-once, the deployed mode): a failover must cost neither a
    score nor a count. The killed node's replica takes its slots; until a replica serves
    them again the writes there cannot be confirmed (WAIT) and the worker retries; the
    killed node, restarted, rejoins as that replica and the worker goes on."""
    settings = cluster_settings(apache_kafka, redis_cluster, served_model, batch_size=100)
    frame = small_transactions.frame
    n = len(frame)
    messages = stream(frame, settings, labels_delay=None, detour=False)
    labels = [m for m in messages if m.topic == settings.topic_labels]
    rest = [m for m in messages if m.topic != settings.topic_labels]
    n_frauds = int(frame["TX_FRAUD"].sum())
    store = RedisStateStore(_client(redis_cluster), prefix=settings.state_key_prefix)
    victim = redis_cluster.primary_of(store.customer_key("0"))
    killed: dict[str, float] = {}
    expected_prefix = issue_prefix()
    try:
        with WorkerProcess(settings, tmp_path / "worker.log") as worker:
            worker.start()
            asyncio.run(publish(settings, labels, rate=10_000))
            # Before their transactions, labels wait for them.
            worker.wait_for('fraudstream_labels_total{outcome="pending"}', n_frauds)

            def kill_mid_stream(published: int) -> None:
                scored = worker.metric('fraudstream_events_total{outcome="scored"}') or 0
                if not killed and scored > n / 3:
                    redis_cluster.kill(victim)
                    killed["at"] = time.monotonic()

            asyncio.run(publish(settings, rest, rate=600, on_progress=kill_mid_stream))
            assert killed, "the primary was not killed"
            # The replica takes over (cluster-node-timeout 2 s); the worker cannot get its
            # writes there confirmed until the killed node is back as its replica.
            redis_cluster.wait_for_failover(victim, timeout_s=30)
            stalled = worker.metric("fraudstream_redis_errors_total") or 0
            redis_cluster.restart(victim)
            redis_cluster.wait_healthy(timeout_s=60)
            records = asyncio.run(
                read_topic(settings, settings.topic_scores, until=n, timeout_s=120)
            )
            recovered_s = time.monotonic() - killed["at"]
            worker.wait_for('fraudstream_events_total{outcome="scored"}', 1)
            assert worker.terminate() == 0, worker.log()
        print(f"failover: {stalled:.0f} redis errors, all scored {recovered_s:.1f} s after")
        scores = scores_by_id(records)
        ids = [str(t) for t in reference["TRANSACTION_ID"]]
        assert sorted(scores) == sorted(ids), "a transaction was lost"
        assert all(len(copies) == 1 for copies in scores.values()), "a duplicate was read"
        ours = np.array([scores[t][0].score for t in ids])
        np.testing.assert_allclose(ours, reference["score"].to_numpy(), rtol=0, atol=1e-5)
        assert stalled > 0, "the failover went unnoticed: was the right node killed?"
        # Nothing counted twice or lost: the state of a run without failure, key for key.
        label_values = [m.value for m in labels]
        expected = uninterrupted_cluster_state(
            redis_cluster, expected_prefix, frame, label_values, TEST_SEQUENCE_LENGTH
        )
        got = _state(redis_cluster, settings.state_key_prefix)
        assert got.keys() == expected.keys()
        assert got == expected
    finally:
        if victim.process is None or victim.process.poll() is not None:
            redis_cluster.restart(victim)
        redis_cluster.wait_healthy(timeout_s=60)
        redis_cluster.flush(settings.state_key_prefix)
        redis_cluster.flush(expected_prefix)
        asyncio.run(store.client.aclose())
