"""The worker as a subprocess on the bundled broker and the real Redis: a full replay.

One uninterrupted run (module fixture) is checked from every side: scores equal to the
offline reference, alerts, shadow scores, dead letters, metrics, a clean SIGTERM. Then a
run whose worker is SIGKILLed mid-stream must end with the same scores and the same Redis
state.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
import redis
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from stream_app.config import Settings
from stream_app.errors import VALIDATION_REASONS, RejectReason
from stream_app.kafka import config as kafka_config
from stream_app.kafka.publisher import key_partition
from stream_app.models.scorer import OnnxScorer
from stream_app.records import DeadLetterHeaders, Decision, ScoreRecord, label_json
from tests.cleanup import keep_for_fixture
from tests.kafka_fixtures import REDIS_URL, Dataset, delete_state, new_settings, read_topic
from tests.resilience_helpers import redis_state
from training.ops.replay import parse_duration, replay_messages
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Labels an hour after their frauds leave the terminal features almost seven days of event
# time to count them (their windows end eight days back). At 600 events/s that is over a
# second of wall clock: the worker must apply a label within it. It does: labels are read
# by the scoring loop's consumer, in its micro-batches, whose fetches wait at most
# consumer_fetch_max_wait_ms (the bundled broker holds a fetch for that whole wait; Apache
# Kafka answers as soon as data arrives).
RATE = 600.0
LABELS_DELAY = "1h"
PROBE_LABEL = label_json(10**12, 1, 1, 1_522_540_800_000, False, 1_522_540_800_000)

# One invalid message per rejection reason (transaction ids cannot clash with the data's).
_TX = {
    "transaction_id": "bad",
    "customer_id": "7",
    "terminal_id": "9",
    "amount": 10.0,
    "timestamp": 1_522_540_992_000,
}
INVALID: dict[RejectReason, bytes] = {
    RejectReason.PAYLOAD_TOO_LARGE: orjson.dumps({**_TX, "note": "x" * 20_000}),
    RejectReason.INVALID_UTF8: b'{"transaction_id": "\xff\xfe"}',
    RejectReason.NOT_JSON: b'{"transaction_id": ',
    RejectReason.NOT_OBJECT: b"[1, 2, 3]",
    RejectReason.MISSING_FIELD: orjson.dumps({k: v for k, v in _TX.items() if k != "amount"}),
    RejectReason.WRONG_TYPE: orjson.dumps({**_TX, "amount": "12.50"}),
    RejectReason.IDENTIFIER_EMPTY: orjson.dumps({**_TX, "customer_id": " "}),
    RejectReason.IDENTIFIER_TOO_LONG: orjson.dumps({**_TX, "terminal_id": "t" * 65}),
    RejectReason.AMOUNT_NOT_FINITE: orjson.dumps(_TX).replace(b"10.0", b"NaN"),
    RejectReason.AMOUNT_NEGATIVE: orjson.dumps({**_TX, "amount": -3.5}),
    RejectReason.AMOUNT_TOO_LARGE: orjson.dumps({**_TX, "amount": 1e300}),
    RejectReason.TIMESTAMP_UNPARSEABLE: orjson.dumps({**_TX, "timestamp": "yesterday"}),
    RejectReason.TIMESTAMP_OUT_OF_RANGE: orjson.dumps({**_TX, "timestamp": "1990-01-01T00:00Z"}),
    RejectReason.INVALID_CURRENCY: orjson.dumps({**_TX, "currency": "euro"}),
}


def detours(customer_id: bytes) -> bool:
    """Customers whose events a careless producer sends unkeyed to the wrong partition."""
    return int(customer_id) % 4 == 0


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    partition: int


def stream(
    frame: pd.DataFrame, settings: Settings, *, labels_delay: str | None, detour: bool = True
) -> list[Outgoing]:
    """What the tests publish: invalid messages, then the data (labels and transactions).

    Labels follow their frauds by ``labels_delay``, interleaved in event-time order; with
    None they all go first.

    With ``detour``, every fourth customer's transactions go unkeyed to the partition next
    to their home, so the worker must re-key them through the repartition topic; all of
    one customer's events take the same path, so their order is kept and scores still
    equal the offline reference.
    """
    n = 2  # partitions, as the fixtures create them
    out = [
        Outgoing(settings.topic_transactions, None, raw, i % n)
        for i, raw in enumerate(INVALID.values())
    ]
    messages = list(
        replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            labels_delay=None if labels_delay is None else parse_duration(labels_delay),
        )
    )
    if labels_delay is None:
        labels = replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            labels_delay=parse_duration("0s"),
        )
        messages = [m for m in labels if m.is_label] + messages
    for m in messages:
        home = key_partition(m.key, n)
        if detour and not m.is_label and detours(m.key):
            out.append(Outgoing(m.topic, None, m.value, (home + 1) % n))
        else:
            out.append(Outgoing(m.topic, m.key, m.value, home))
    return out


async def publish(
    settings: Settings,
    messages: list[Outgoing],
    *,
    rate: float,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Publish in order, ``rate`` messages a second (in slices of 50)."""
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    try:
        started = time.monotonic()
        for start in range(0, len(messages), 50):
            futures = [
                await producer.send(m.topic, m.value, key=m.key, partition=m.partition)
                for m in messages[start : start + 50]
            ]
            await asyncio.gather(*futures)
            if on_progress is not None:
                on_progress(start + len(futures))
            ahead = (start + 50) / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    finally:
        await producer.stop()


def probe_labels(settings: Settings, worker: WorkerProcess) -> None:
    """Publish a harmless label and wait until the worker counts it."""
    asyncio.run(
        publish(settings, [Outgoing(settings.topic_labels, b"1", PROBE_LABEL, 0)], rate=1000)
    )
    # Its transaction was never scored: the label waits for it (and is refused after
    # FRAUDSTREAM_LABEL_WAIT_S), changing no counter.
    worker.wait_for('fraudstream_labels_total{outcome="pending"}', 1, timeout_s=60)


def scores_by_id(records: list[ConsumerRecord[bytes, bytes]]) -> dict[str, list[ScoreRecord]]:
    out: dict[str, list[ScoreRecord]] = {}
    for message in records:
        record = ScoreRecord.from_json(message.value)
        out.setdefault(record.transaction_id, []).append(record)
    return out


def state_of(prefix: str) -> dict[str, object]:
    """Every key under a prefix, the prefix removed, with its value (TTLs ignored)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return redis_state(client, prefix)
    finally:
        client.close()


@dataclass(frozen=True)
class Run:
    settings: Settings
    exit_code: int
    log: str
    metrics: dict[str, float]
    scores: dict[str, list[ScoreRecord]]
    alerts: list[ScoreRecord]
    shadow: dict[str, list[ScoreRecord]]
    dead_letters: list[ConsumerRecord[bytes, bytes]]


@pytest.fixture(scope="module")
def uninterrupted(
    kafka_broker: str,
    served_model: Path,
    second_model: Path,
    small_transactions: Dataset,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Run]:
    """A whole replay through one worker, labels interleaved a day after their frauds."""
    settings = new_settings(kafka_broker, model_dir=served_model, challenger_model_dir=second_model)
    keep_for_fixture(settings.state_key_prefix)  # the tests compare against it
    frame = small_transactions.frame
    log_path = tmp_path_factory.mktemp("uninterrupted") / "worker.log"
    try:
        with WorkerProcess(settings, log_path) as worker:
            worker.start()
            probe_labels(settings, worker)
            asyncio.run(
                publish(settings, stream(frame, settings, labels_delay=LABELS_DELAY), rate=RATE)
            )
            n = len(frame)
            scores = asyncio.run(read_topic(settings, settings.topic_scores, until=n))
            worker.wait_for('fraudstream_events_total{outcome="scored"}', n)
            shadow = asyncio.run(read_topic(settings, settings.topic_shadow_scores, until=n))
            dead = asyncio.run(
                read_topic(settings, settings.topic_dead_letters, until=len(INVALID))
            )
            n_alerts = int(worker.metric('fraudstream_alerts_total{decision="review"}') or 0) + int(
                worker.metric('fraudstream_alerts_total{decision="decline"}') or 0
            )
            alerts = asyncio.run(read_topic(settings, settings.topic_alerts, until=n_alerts))
            time.sleep(1.5)  # one more lag refresh after the last commit
            metrics = worker.scrape()
            code = worker.terminate()
            yield Run(
                settings=settings,
                exit_code=code,
                log=worker.log(),
                metrics=metrics,
                scores=scores_by_id(scores),
                alerts=[ScoreRecord.from_json(m.value) for m in alerts],
                shadow=scores_by_id(shadow),
                dead_letters=dead,
            )
    finally:
        delete_state(settings.state_key_prefix)


@pytest.fixture(scope="module")
def reference(small_transactions: Dataset, served_model: Path) -> pd.DataFrame:
    return score_table(small_transactions.frame, OnnxScorer(served_model)).table


def test_every_transaction_is_scored_once_as_the_offline_reference(
    uninterrupted: Run, reference: pd.DataFrame
) -> None:
    ids = [str(t) for t in reference["TRANSACTION_ID"]]
    assert sorted(uninterrupted.scores) == sorted(ids)
    assert all(len(records) == 1 for records in uninterrupted.scores.values())
    ours = np.array([uninterrupted.scores[t][0].score for t in ids])
    np.testing.assert_allclose(ours, reference["score"].to_numpy(), rtol=0, atol=1e-5)
    assert [uninterrupted.scores[t][0].decision.value for t in ids] == list(reference["decision"])
    assert {r[0].model_version for r in uninterrupted.scores.values()} == {"test-a"}


def test_alerts_are_the_review_and_decline_scores_with_reasons(uninterrupted: Run) -> None:
    alerted = {
        t
        for t, records in uninterrupted.scores.items()
        if records[0].decision is not Decision.APPROVE
    }
    assert alerted and {a.transaction_id for a in uninterrupted.alerts} == alerted
    for alert in uninterrupted.alerts:
        assert alert == uninterrupted.scores[alert.transaction_id][0]
        assert 1 <= len(alert.reasons) <= 3


def test_the_challenger_scores_in_shadow(
    uninterrupted: Run, small_transactions: Dataset, second_model: Path
) -> None:
    reference = score_table(small_transactions.frame, OnnxScorer(second_model)).table
    ids = [str(t) for t in reference["TRANSACTION_ID"]]
    assert sorted(uninterrupted.shadow) == sorted(ids)
    ours = np.array([uninterrupted.shadow[t][0].score for t in ids])
    np.testing.assert_allclose(ours, reference["score"].to_numpy(), rtol=0, atol=1e-5)
    assert {r[0].model_version for r in uninterrupted.shadow.values()} == {"test-b"}


def test_invalid_messages_are_dead_lettered_with_their_reason_and_source(
    uninterrupted: Run,
) -> None:
    by_reason = {}
    for message in uninterrupted.dead_letters:
        headers = {k: v.decode() for k, v in message.headers}
        by_reason[RejectReason(headers[DeadLetterHeaders.REASON])] = (message, headers)
    assert set(by_reason) == set(VALIDATION_REASONS)
    for reason, (message, headers) in by_reason.items():
        assert message.value == INVALID[reason]  # the original bytes
        assert headers[DeadLetterHeaders.SOURCE_TOPIC] == uninterrupted.settings.topic_transactions
        assert int(headers[DeadLetterHeaders.SOURCE_PARTITION]) in (0, 1)
        assert int(headers[DeadLetterHeaders.SOURCE_OFFSET]) >= 0
        assert headers[DeadLetterHeaders.DETAIL]


def test_metrics_tell_what_happened(uninterrupted: Run, small_transactions: Dataset) -> None:
    m = uninterrupted.metrics
    n = len(small_transactions.frame)
    frauds = int(small_transactions.frame["TX_FRAUD"].sum())
    assert m['fraudstream_events_total{outcome="scored"}'] == n
    assert m['fraudstream_events_total{outcome="duplicate"}'] == 0
    assert m['fraudstream_events_total{outcome="dead_letter"}'] == len(INVALID)
    for reason in VALIDATION_REASONS:
        assert m[f'fraudstream_dead_letters_total{{reason="{reason.value}"}}'] == 1
    assert m['fraudstream_events_total{outcome="unscorable"}'] == 0
    assert m['fraudstream_labels_total{outcome="fraud"}'] == frauds
    assert m["fraudstream_repartitioned_total"] > 0
    assert m["fraudstream_shadow_scores_total"] == n
    assert m["fraudstream_end_to_end_latency_seconds_count"] == n
    assert m["fraudstream_score_count"] == n
    assert m['fraudstream_model_info{role="champion",version="test-a"}'] == 1
    assert m['fraudstream_model_info{role="challenger",version="test-b"}'] == 1
    # One commit path: every transaction, dead letter, forward and label (the frauds' and
    # the probe's) is committed once.
    assert (
        m["fraudstream_offsets_committed_total"]
        == n + len(INVALID) + m["fraudstream_repartitioned_total"] + frauds + 1
    )
    assert m["fraudstream_last_commit_timestamp_seconds"] > time.time() - 600
    assert not math.isnan(m["fraudstream_score_psi"])
    lags = {k: v for k, v in m.items() if k.startswith("fraudstream_consumer_lag")}
    assert lags and all(v == 0 for v in lags.values())
    assert m["process_resident_memory_bytes"] > 0


def test_sigterm_drains_and_exits_cleanly(uninterrupted: Run) -> None:
    assert uninterrupted.exit_code == 0, uninterrupted.log
    assert "scoring stopped" in uninterrupted.log
    assert "Traceback" not in uninterrupted.log


@pytest.mark.resilience
def test_a_sigkilled_worker_loses_nothing_and_counts_nothing_twice(
    uninterrupted: Run,
    reference: pd.DataFrame,
    kafka_broker: str,
    served_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    # Small batches after the restart: a backlog is read partition by partition, a batch at
    # a time, and a 1,000-event batch of one partition is two weeks of this small dataset:
    # terminal windows (global, eight days back) would then miss the other partition's
    # transactions. Live, partitions advance together with the clock and this cannot bite.
    settings = new_settings(kafka_broker, model_dir=served_model, batch_size=100)
    frame = small_transactions.frame
    n = len(frame)
    # All keyed: re-keyed events reach the state a round trip later than the others, which
    # in a backlog is days of this small dataset's event time (see above).
    messages = stream(frame, settings, labels_delay=LABELS_DELAY, detour=False)
    n_labels = int(frame["TX_FRAUD"].sum())
    try:
        first = WorkerProcess(settings, tmp_path / "first.log").start()
        second = WorkerProcess(
            # Each replica has a name of its own (under exactly-once, its transactional id).
            settings.model_copy(update={"instance_id": "test-second"}),
            tmp_path / "second.log",
        )
        with first, second:
            probe_labels(settings, first)
            # Labels before transactions: every label waits for its transaction and is
            # counted the moment it is scored, whichever consumer recovers first, so the
            # expected scores stay exact.
            labels = [m for m in messages if m.topic == settings.topic_labels]
            rest = [m for m in messages if m.topic != settings.topic_labels]
            asyncio.run(publish(settings, labels, rate=10_000))
            first.wait_for('fraudstream_labels_total{outcome="pending"}', n_labels + 1)

            def kill_mid_stream(published: int) -> None:
                scored = first.metric('fraudstream_events_total{outcome="scored"}') or 0
                if first.process is not None and first.process.poll() is None and scored > n / 3:
                    first.kill()

            asyncio.run(publish(settings, rest, rate=1000, on_progress=kill_mid_stream))
            assert first.process is not None and first.process.returncode == -9, "not killed"
            second.start(timeout_s=120)
            records = asyncio.run(read_topic(settings, settings.topic_scores, until=n))
            second.wait_for('fraudstream_events_total{outcome="scored"}', 1)
            scores = scores_by_id(records)
            while len(scores) < n:  # duplicates make the count reach n before every id
                more = asyncio.run(
                    read_topic(
                        settings, settings.topic_scores, until=len(records) + 1, timeout_s=10
                    )
                )
                if len(more) == len(records):
                    break
                records = more
                scores = scores_by_id(records)
            assert second.terminate() == 0, second.log()

        ids = [str(t) for t in reference["TRANSACTION_ID"]]
        assert sorted(scores) == sorted(ids), "a transaction was lost"
        expected = dict(zip(ids, reference["score"], strict=True))
        for tx, copies in scores.items():
            assert abs(copies[0].score - expected[tx]) <= 1e-5
            for copy in copies[1:]:  # re-published after the kill: identical but scored_at
                assert copy.model_dump(exclude={"scored_at"}) == copies[0].model_dump(
                    exclude={"scored_at"}
                )
        # Nothing counted twice: the state equals the uninterrupted run's, key for key.
        killed_state = state_of(settings.state_key_prefix)
        assert killed_state == state_of(uninterrupted.settings.state_key_prefix)
    finally:
        delete_state(settings.state_key_prefix)
