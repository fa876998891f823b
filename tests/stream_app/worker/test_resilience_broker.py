"""A 10-second broker stall (SIGSTOP, SIGCONT) mid-stream: nothing lost, recovery alone.

The test owns its broker (of the lane's kind: the bundled one, or Apache Kafka with the
deployed exactly-once settings), so freezing it stalls no other test. While it is frozen
its sockets stay open and answer nothing: fetches, produce requests, commits and heartbeats
all hang, the worst kind of outage for a client (no error to react to, only timeouts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stream_app.config import Settings
from tests.kafka_fixtures import Broker
from tests.resilience_helpers import (
    BackgroundPublisher,
    account,
    own_broker,
    read_records,
    score_records,
    simulated,
    transaction_ids,
    transaction_messages,
    wait_until,
)
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]

EVENTS = 15_000
RATE = 1_000.0
STALL_S = 10.0


def test_a_broker_stall_loses_nothing_and_the_worker_recovers_alone(
    kafka_broker: Broker, make_settings: Callable[..., Settings], served_model: Path, tmp_path: Path
) -> None:
    broker = own_broker(kafka_broker.kind, tmp_path)
    try:
        settings = make_settings(
            model_dir=served_model, kafka_bootstrap_servers=broker.bootstrap_servers
        )
        frame = simulated(n_customers=200, n_days=45, seed=6)
        messages = transaction_messages(frame, settings, limit=EVENTS)
        ids = transaction_ids(messages)
        publisher = BackgroundPublisher(settings, messages, RATE)
        with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
            assert worker.process is not None
            pid = worker.process.pid
            publisher.start()
            publisher.wait_for(EVENTS // 4)
            scored_before = worker.metric('fraudstream_events_total{outcome="scored"}') or 0
            broker.pause()
            time.sleep(STALL_S)
            frozen = worker.metric('fraudstream_events_total{outcome="scored"}') or 0
            broker.resume()
            publisher.join(timeout_s=120)
            records = read_records(settings, settings.topic_scores, ids=ids, timeout_s=120)
            wait_until(lambda: worker.metric("fraudstream_ready") == 1, 60, "ready again")
            metrics = worker.scrape()
            log = worker.log()
            assert worker.process.pid == pid and worker.process.poll() is None  # never died
            assert worker.terminate() == 0, log

        accounting = account(score_records(records), ids)
        accounting.assert_complete()
        # The stall really stopped the flow: at most the batches already fetched got scored.
        assert frozen - scored_before <= 2 * settings.batch_size
        scored = metrics['fraudstream_events_total{outcome="scored"}']
        duplicate = metrics['fraudstream_events_total{outcome="duplicate"}']
        if settings.exactly_once and "batch aborted" in log:
            # A batch whose transaction was refused or stale is aborted and re-read: its
            # events, already in the state, come back as duplicates (identical records).
            assert scored <= EVENTS <= scored + duplicate
        else:
            assert scored == EVENTS
        assert "Traceback" not in log
        errors = sum(
            v for k, v in metrics.items() if k.startswith("fraudstream_kafka_errors_total")
        )
        print(
            f"\n{EVENTS:,} events, broker frozen {STALL_S:g} s: {errors:.0f} Kafka errors "
            f"counted, {accounting.records:,} records ({accounting.duplicates} duplicates, "
            "identical)"
        )
    finally:
        broker.stop()
