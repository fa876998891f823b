"""No poison pill: an event the model cannot score never stops the worker.

The champion here is a real exported model that outputs NaN for some amounts the event
contract accepts (a model fault no validation foresees). Before, the first such event
stopped the worker with ``ModelError``, and every restart stopped again on the same
uncommitted batch: one message halted scoring for everyone. Now the event is dead-lettered
(``unscorable``, original bytes, source offsets), every other event is scored, and the
worker keeps running, on both broker lanes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from stream_app.config import Settings
from stream_app.errors import RejectReason
from stream_app.records import DeadLetterHeaders
from tests.kafka_fixtures import Dataset
from tests.model_fixtures import POISON_AMOUNT
from tests.resilience_helpers import (
    Message,
    account,
    publish,
    read_records,
    score_records,
    transaction_messages,
)
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience]

POISONED_EVERY = 97  # one event in 97 carries an amount the model cannot score


def test_unscorable_events_are_dead_lettered_and_the_worker_goes_on(
    make_settings: Callable[..., Settings],
    poisoned_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    settings = make_settings(model_dir=poisoned_model)
    messages = transaction_messages(small_transactions.frame, settings, limit=2_000)
    poisoned: dict[str, bytes] = {}
    stream: list[Message] = []
    for i, message in enumerate(messages):
        if i % POISONED_EVERY == 5:
            doc = orjson.loads(message.value or b"")
            doc["amount"] = POISON_AMOUNT * 3  # valid: the contract allows up to 1e9
            message = Message(message.topic, message.key, orjson.dumps(doc))
            poisoned[str(doc["transaction_id"])] = message.value or b""
        stream.append(message)
    scorable = [
        str(orjson.loads(m.value or b"")["transaction_id"])
        for m in stream
        if str(orjson.loads(m.value or b"")["transaction_id"]) not in poisoned
    ]

    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        assert worker.process is not None
        pid = worker.process.pid
        publish(settings, stream, rate=2_000)
        worker.wait_for("fraudstream_offsets_committed_total", len(stream), 120)
        metrics = worker.scrape()
        assert worker.process.pid == pid and worker.process.poll() is None  # never stopped
        log = worker.log()
        assert worker.terminate() == 0, log
    assert "Traceback" not in log

    dead = read_records(settings, settings.topic_dead_letters)
    assert sorted(m.value or b"" for m in dead) == sorted(poisoned.values())  # bytes untouched
    for message in dead:
        headers = {k: v.decode() for k, v in message.headers}
        assert headers[DeadLetterHeaders.REASON] == RejectReason.UNSCORABLE.value
        assert "test-poisoned" in headers[DeadLetterHeaders.DETAIL]
        assert headers[DeadLetterHeaders.SOURCE_TOPIC] in {
            settings.topic_transactions,
            settings.topic_repartition,
        }
    records = score_records(read_records(settings, settings.topic_scores, ids=scorable))
    assert not {r.transaction_id for r in records} & set(poisoned)
    account(records, scorable).assert_complete()  # every other event scored, once
    assert metrics['fraudstream_events_total{outcome="unscorable"}'] == len(poisoned)
    assert metrics['fraudstream_dead_letters_total{reason="unscorable"}'] == len(poisoned)
    assert metrics['fraudstream_events_total{outcome="scored"}'] == len(scorable)
