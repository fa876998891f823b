"""A hostile producer cannot poison the worker's state, through the real worker, Redis and
broker.

Before the transaction ledger, a reused transaction id was published with the first
event's score (a 9,999.00 payment at another terminal scored as the first one's 0.0026,
approve), labels for transactions the worker never saw were counted (20 fakes turned a clean
terminal's payment from approve to decline), and one corrupt key in Redis stopped the worker
(a 50-byte customer value: ``ValueError``; a hash at a terminal key: WRONGTYPE retried for
ever). Each test below failed then.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from stream_app.config import Settings
from stream_app.errors import RejectReason
from stream_app.records import DeadLetterHeaders, ScoreRecord
from stream_app.scoring.reasons import STATE_RESET_REASON
from stream_app.state.redis import RedisStateStore
from tests.kafka_fixtures import REDIS_URL, Broker, Dataset, delete_state, new_settings
from tests.resilience_helpers import (
    Message,
    publish,
    read_records,
    same_record,
    score_records,
    transaction_messages,
)
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience]

COMMITTED = "fraudstream_offsets_committed_total"


def _doc(message: Message) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(message.value or b"")
    return doc


def _message(settings: Settings, doc: dict[str, Any], topic: str | None = None) -> Message:
    return Message(
        topic or settings.topic_transactions,
        str(doc["customer_id"]).encode(),
        orjson.dumps(doc),
    )


def _reasons(records: list[Any]) -> list[str]:
    return [dict(r.headers)[DeadLetterHeaders.REASON].decode() for r in records]


def _by_id(records: list[ScoreRecord]) -> dict[str, list[ScoreRecord]]:
    grouped: dict[str, list[ScoreRecord]] = defaultdict(list)
    for record in records:
        grouped[record.transaction_id].append(record)
    return grouped


def test_a_reused_transaction_id_is_dead_lettered_not_scored_as_the_first(
    make_settings: Callable[..., Settings], small_transactions: Dataset, tmp_path: Path
) -> None:
    settings = make_settings()
    messages = transaction_messages(small_transactions.frame, settings, limit=400)
    victim, other, redelivered = _doc(messages[100]), _doc(messages[200]), messages[150]
    conflicting = [
        # The same id for a 9,999.00 payment at another terminal, and under another customer.
        _message(settings, {**victim, "amount": 9_999.0, "terminal_id": other["terminal_id"]}),
        _message(settings, {**victim, "customer_id": other["customer_id"]}),
    ]
    ids = [str(_doc(m)["transaction_id"]) for m in messages]
    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        publish(settings, messages)
        worker.wait_for(COMMITTED, len(messages), 120)
        publish(settings, [*conflicting, redelivered])
        worker.wait_for(COMMITTED, len(messages) + 3, 60)
        metrics = worker.scrape()
        log = worker.log()
        assert worker.terminate() == 0, log
    assert "Traceback" not in log

    dead = read_records(settings, settings.topic_dead_letters)
    assert sorted(m.value or b"" for m in dead) == sorted(m.value or b"" for m in conflicting)
    assert _reasons(dead) == [RejectReason.CONFLICTING_DUPLICATE.value] * 2
    records = _by_id(score_records(read_records(settings, settings.topic_scores, ids=ids)))
    assert len(records[str(victim["transaction_id"])]) == 1  # the conflicts got no record
    [first, again] = records[str(_doc(redelivered)["transaction_id"])]
    assert same_record(first, again)  # a true redelivery: the identical record
    assert metrics['fraudstream_events_total{outcome="conflicting_duplicate"}'] == 2
    assert metrics['fraudstream_dead_letters_total{reason="conflicting_duplicate"}'] == 2


def _label(tx: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {
        "transaction_id": str(tx["transaction_id"]),
        "customer_id": str(tx["customer_id"]),
        "terminal_id": str(tx["terminal_id"]),
        "is_fraud": True,
        "event_time": tx["timestamp"],
        "reported_at": tx["timestamp"],
        **changes,
    }


def test_labels_count_only_for_the_transaction_they_name(
    make_settings: Callable[..., Settings], small_transactions: Dataset, tmp_path: Path
) -> None:
    settings = make_settings(label_wait_s=2.0)
    messages = transaction_messages(small_transactions.frame, settings, limit=400)
    target = _doc(messages[120])
    fakes = [_label(target, transaction_id=f"fake-{i}") for i in range(20)]
    mismatch = _label(target, terminal_id="elsewhere")
    store = RedisStateStore(
        redis.asyncio.Redis.from_url(REDIS_URL), prefix=settings.state_key_prefix
    )
    terminal_key = store.terminal_key(str(target["terminal_id"]))
    client = redis.Redis.from_url(REDIS_URL)
    labels = [_message(settings, d, settings.topic_labels) for d in [*fakes, mismatch]]
    unknown = 'fraudstream_dead_letters_total{reason="label_unknown_transaction"}'
    try:
        with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
            publish(settings, messages)
            worker.wait_for(COMMITTED, len(messages), 120)
            before = client.get(terminal_key)
            publish(settings, labels)
            worker.wait_for(unknown, len(fakes), 60)
            worker.wait_for('fraudstream_dead_letters_total{reason="label_mismatch"}', 1, 30)
            # Twenty fakes and a mismatch later, the terminal's counters have not moved.
            assert client.get(terminal_key) == before
            publish(settings, [_message(settings, _label(target), settings.topic_labels)])
            worker.wait_for('fraudstream_labels_total{outcome="fraud"}', 1, 30)
            after = client.get(terminal_key)
            metrics = worker.scrape()
            log = worker.log()
            assert worker.terminate() == 0, log
    finally:
        client.close()
    assert "Traceback" not in log
    assert before is not None and after is not None and after != before
    dead = read_records(settings, settings.topic_label_dead_letters, committed=False)
    assert sorted(m.value or b"" for m in dead) == sorted(m.value or b"" for m in labels)
    assert sorted(_reasons(dead)) == sorted(
        [RejectReason.LABEL_MISMATCH.value] + [RejectReason.LABEL_UNKNOWN_TRANSACTION.value] * 20
    )
    assert metrics[unknown] == len(fakes)
    assert metrics['fraudstream_labels_total{outcome="fraud"}'] == 1


def test_a_corrupt_key_is_set_aside_and_the_worker_goes_on(
    bundled_broker: Broker, small_transactions: Dataset, tmp_path: Path
) -> None:
    """State handling does not depend on the broker: the bundled one suffices."""
    settings = new_settings(bundled_broker)
    messages = transaction_messages(small_transactions.frame, settings, limit=600)
    head, tail = messages[:300], messages[300:]
    customer = str(_doc(tail[0])["customer_id"])
    terminal = next(
        str(_doc(m)["terminal_id"])
        for m in tail
        if _doc(m)["customer_id"] != _doc(tail[0])["customer_id"]
        and _doc(m)["terminal_id"] != _doc(tail[0])["terminal_id"]
    )
    # The events that find the corrupt keys: the first of the customer, of the terminal.
    finders = {
        str(_doc(tail[0])["transaction_id"]),
        next(
            str(_doc(m)["transaction_id"]) for m in tail if str(_doc(m)["terminal_id"]) == terminal
        ),
    }
    store = RedisStateStore(
        redis.asyncio.Redis.from_url(REDIS_URL), prefix=settings.state_key_prefix
    )
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
            publish(settings, head)
            worker.wait_for(COMMITTED, len(head), 120)
            client.set(store.customer_key(customer), b"x" * 50)
            client.delete(store.terminal_key(terminal))
            client.hset(store.terminal_key(terminal), "field", "value")
            publish(settings, tail)
            worker.wait_for(COMMITTED, len(messages), 60)
            metrics = worker.scrape()
            log = worker.log()
            assert worker.process is not None and worker.process.poll() is None
            assert worker.terminate() == 0, log
        quarantined = {
            k.decode() for k in client.scan_iter(match=f"{settings.state_key_prefix}:*quarantined")
        }
    finally:
        client.close()
        delete_state(settings.state_key_prefix)
    assert quarantined == {
        f"{store.customer_key(customer)}:quarantined",
        f"{store.terminal_key(terminal)}:quarantined",
    }
    assert metrics["fraudstream_state_quarantined_total"] == 2
    assert log.count("state key") == 2 and store.customer_key(customer) in log
    ids = [str(_doc(m)["transaction_id"]) for m in messages]
    records = score_records(read_records(settings, settings.topic_scores, ids=ids))
    assert {r.transaction_id for r in records} == set(ids)  # every event scored
    reset = {r.transaction_id for r in records if STATE_RESET_REASON in r.reasons}
    assert reset == finders
