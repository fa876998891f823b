"""Lost state is detected, reported and rebuilt: a real worker, a redis-server of the test's
own (so ``FLUSHALL`` touches no other test) and the session's broker.

Every fraud label is published first, then 70% of the transactions (event-time order);
their scores equal the offline reference (an uninterrupted run). Then Redis is flushed:

* the running worker notices within seconds (``fraudstream_state_lost`` 1,
  ``fraudstream_ready`` 0, an ERROR naming ``fraudstream rebuild-state``) and keeps scoring;
* a worker started on the empty Redis says so at start-up (its groups have committed
  offsets, Redis has no marker);
* ``fraudstream rebuild-state --from-topics`` rebuilds the state from the retained topics;
  a worker started afterwards is ready, not lost, and scores the rest of the replay exactly
  as the uninterrupted run does.

In the ``no-rebuild`` case Redis is killed and restarted empty instead (no persistence),
and nothing is rebuilt: the rest of the replay is scored from empty state:
every event is scored, flagged, and many scores differ from the uninterrupted run's, which
is what the test would catch if the rebuild were wrong.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
import redis

from stream_app.config import Settings, settings_environment
from stream_app.models.scorer import OnnxScorer
from stream_app.records import ScoreRecord
from tests.kafka_fixtures import Broker, Dataset, new_settings
from tests.resilience_helpers import (
    Message,
    environment_without_settings,
    publish,
    read_records,
    redis_state,
    score_records,
    wait_until,
)
from training.ops.replay import parse_duration, replay_messages, replay_order
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table
from training.transactions import write_transactions

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]

SCORED = 'fraudstream_events_total{outcome="scored"}'
LOST = "fraudstream_state_lost"
# Transactions a second: slow enough for the worker to take both partitions in step (the
# terminal counters it reads are shared by customers of both), as an uninterrupted
# producer would (tests/stream_app/worker/test_replay.py uses the same rate).
RATE = 600.0


def _messages(frame: pd.DataFrame, settings: Settings) -> tuple[list[Message], list[Message]]:
    """Every fraud's label, then the transactions in event-time order.

    Labels go first, so what the worker counts does not depend on how fast its labels
    consumer keeps up: each waits for its transaction and counts when it is scored, as the
    offline reference counts every label (its terminal windows end 7 days back).
    """
    replay = list(
        replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            labels_delay=parse_duration("0s"),
        )
    )
    labels = [Message(m.topic, m.key, m.value) for m in replay if m.is_label]
    transactions = [Message(m.topic, m.key, m.value) for m in replay if not m.is_label]
    return labels, transactions


def _ids(messages: list[Message], topic: str) -> list[str]:
    return [
        str(orjson.loads(m.value or b"{}")["transaction_id"]) for m in messages if m.topic == topic
    ]


def _differing(
    settings: Settings, ids: list[str], reference: dict[str, tuple[float, str]]
) -> tuple[int, int, int]:
    """(records found, scores differing by more than 1e-5, decisions differing) for ``ids``."""
    records = score_records(read_records(settings, settings.topic_scores, ids=ids, timeout_s=90))
    first: dict[str, ScoreRecord] = {}
    for record in records:
        first.setdefault(record.transaction_id, record)
    found = [first[i] for i in ids if i in first]
    scores = sum(1 for r in found if abs(r.score - reference[r.transaction_id][0]) > 1e-5)
    decisions = sum(1 for r in found if r.decision.value != reference[r.transaction_id][1])
    return len(found), scores, decisions


def _labels_handled(worker: WorkerProcess) -> float:
    """Labels the worker took in: counted, or waiting for their transaction."""
    metrics = worker.scrape()
    return sum(
        value
        for name, value in metrics.items()
        if name.startswith("fraudstream_labels_total{") and "dead_letter" not in name
    )


def _histories(client: redis.Redis, prefix: str) -> dict[str, object]:
    """The customer histories and terminal counters under ``prefix`` (no ledger, marker)."""
    state = redis_state(client, prefix)
    return {k: v for k, v in state.items() if k.startswith((":c:", ":t2:"))}


def _rebuild(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**environment_without_settings(), **settings_environment(settings)}
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "rebuild-state", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("rebuild", [True, False], ids=["rebuild", "no-rebuild"])
def test_lost_state_is_reported_and_rebuilt(
    rebuild: bool,
    kafka_broker: Broker,
    served_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    redis_server = RedisServer(tmp_path / "redis", durable=False).start()
    try:
        settings = new_settings(
            kafka_broker,
            model_dir=served_model,
            redis_url=redis_server.url,
            state_check_interval_s=0.5,
        )
        prefix = settings.state_key_prefix
        frame = small_transactions.frame
        table = score_table(frame, OnnxScorer(served_model)).table
        reference = {
            str(t): (float(s), str(d))
            for t, s, d in zip(
                table["TRANSACTION_ID"], table["score"], table["decision"], strict=True
            )
        }
        labels, transactions = _messages(frame, settings)
        cut = int(0.7 * len(transactions))
        first, rest = transactions[:cut], transactions[cut:]
        tx = settings.topic_transactions
        first_ids, rest_ids = _ids(first, tx), _ids(rest, tx)

        log1 = tmp_path / "worker-1.log"
        with WorkerProcess(settings, log1).start() as worker:
            assert worker.metric(LOST) == 0
            publish(settings, labels)
            wait_until(
                lambda: _labels_handled(worker) >= len(labels), 60, "the labels to be taken in"
            )
            publish(settings, first, rate=RATE)
            worker.wait_for(SCORED, len(first_ids), 90)
            time.sleep(2.0)  # the last batches settle and commit
            found, scores, decisions = _differing(settings, first_ids, reference)
            assert (found, scores, decisions) == (len(first_ids), 0, 0)  # uninterrupted so far

            if rebuild:
                redis_server.client().flushall()
            else:  # a crash and a restart without persistence: the same loss, another way
                redis_server.kill()
                redis_server.start()
            wait_until(lambda: worker.metric(LOST) == 1, 15, "the worker to report the loss")
            assert worker.metric("fraudstream_ready") == 0
            text = log1.read_text(errors="replace")
            assert "ERROR" in text and "STATE LOST" in text and "is gone" in text
            assert "fraudstream rebuild-state" in text
            if not rebuild:
                # It keeps scoring, flagged, from empty state.
                publish(settings, rest, rate=RATE)
                worker.wait_for(SCORED, len(first_ids) + len(rest_ids), 90)
                assert worker.metric(LOST) == 1 and worker.metric("fraudstream_ready") == 0
                found, scores, decisions = _differing(settings, rest_ids, reference)
                print(
                    f"\nwithout rebuild: {scores} of {found} scores and {decisions} decisions "
                    "differ from the uninterrupted run"
                )
                assert found == len(rest_ids)
                assert scores > 0
                assert worker.terminate() == 0
                return
            assert worker.terminate() == 0

        # Started on the emptied Redis: the groups have committed offsets, no marker.
        log2 = tmp_path / "worker-2.log"
        with WorkerProcess(settings, log2).start(until=(LOST, 1.0)) as worker:
            time.sleep(1.0)
            assert worker.metric("fraudstream_ready") == 0
            assert worker.terminate() == 0
        assert "committed offsets but Redis holds no state" in log2.read_text(errors="replace")

        done = _rebuild(settings, "--from-topics")
        assert done.returncode == 0, done.stdout + done.stderr
        print(f"\n{done.stdout.strip()}")
        assert f"from {len(first_ids):,} transactions and {len(labels):,} labels" in done.stdout
        refused = _rebuild(settings, "--from-topics")  # the state is there now
        assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
        # The same transactions from a file (its frauds labelled) rebuild the same customer
        # histories and terminal counters, under a prefix of their own.
        part = tmp_path / "first.parquet"
        write_transactions(frame.iloc[replay_order(frame)[:cut]], part)
        from_file = settings.model_copy(update={"state_key_prefix": f"{prefix}-file"})
        done = _rebuild(from_file, "--data", str(part))
        assert done.returncode == 0, done.stdout + done.stderr
        with redis_server.client() as client:
            assert _histories(client, prefix) == _histories(client, f"{prefix}-file")
            assert len(_histories(client, prefix)) > 100

        log3 = tmp_path / "worker-3.log"
        with WorkerProcess(settings, log3).start() as worker:
            assert worker.metric(LOST) == 0
            publish(settings, rest, rate=RATE)
            worker.wait_for(SCORED, len(rest_ids), 90)
            found, scores, decisions = _differing(settings, rest_ids, reference)
            print(
                f"after rebuild-state: {scores} of {found} scores and {decisions} decisions "
                "differ from the uninterrupted run"
            )
            assert worker.metric(LOST) == 0
            assert worker.terminate() == 0
        assert (found, scores, decisions) == (len(rest_ids), 0, 0)
        assert np.isfinite([reference[i][0] for i in rest_ids]).all()
    finally:
        redis_server.stop()
