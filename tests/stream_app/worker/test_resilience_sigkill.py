"""SIGKILL the worker three times during a 50,000-event replay: nothing lost or counted twice.

Each kill leaves batches scored but uncommitted, state calls applied but unanswered, and
outputs sent but unacknowledged. The restarted worker re-reads from the last commit; the
state recognises what it already applied, so the re-published records are identical and the
counters count every transaction once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from stream_app.config import Settings
from tests.kafka_fixtures import REDIS_URL
from tests.resilience_helpers import (
    BackgroundPublisher,
    account,
    delete_keys,
    read_records,
    redis_state,
    score_records,
    simulated,
    transaction_ids,
    transaction_messages,
    uninterrupted_state,
)
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]

EVENTS = 50_000
RATE = 1_500.0
KILLS = 3
# Each victim is killed once it has scored this many events: right after a restart that
# is in the middle of catching up on a backlog, with batches in every stage.
SCORED_BEFORE_KILL = 2_000


def test_three_sigkills_during_a_replay_lose_nothing_and_count_nothing_twice(
    make_settings: Callable[..., Settings], served_model: Path, tmp_path: Path
) -> None:
    # 250 customers over 110 days: customer histories as long as production ones, yet the
    # whole state is ~750 keys, so comparing two copies of it takes well under a second.
    frame = simulated(n_customers=250, n_days=110, seed=11)
    assert len(frame) >= EVENTS
    # The shortest session timeout Apache Kafka accepts by default (its
    # group.min.session.timeout.ms): the dead member leaves the group sooner.
    settings = make_settings(model_dir=served_model, consumer_session_timeout_s=6.0)
    messages = transaction_messages(frame, settings, limit=EVENTS)
    ids = transaction_ids(messages)

    publisher = BackgroundPublisher(settings, messages, RATE)
    kills: list[tuple[int, float]] = []  # (published, scored by the victim) at each kill
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(WorkerProcess(settings, tmp_path / "worker-0.log").start())
        publisher.start()
        for k in range(1, KILLS + 1):
            worker.wait_for('fraudstream_events_total{outcome="scored"}', SCORED_BEFORE_KILL)
            scored = worker.metric('fraudstream_events_total{outcome="scored"}') or 0
            worker.kill()
            kills.append((publisher.published, scored))
            restarted = WorkerProcess(settings, tmp_path / f"worker-{k}.log")
            worker = stack.enter_context(restarted.start())
        publisher.join()
        read_records(settings, settings.topic_scores, ids=ids, timeout_s=120)
        assert worker.terminate() == 0, worker.log()
    records = score_records(read_records(settings, settings.topic_scores))

    assert len(kills) == KILLS
    # Every kill hit a worker in the middle of the replay.
    assert all(published < EVENTS for published, _ in kills), kills
    accounting = account(records, ids)
    accounting.assert_complete()
    assert accounting.scored == EVENTS

    # The state equals that of an uninterrupted run, key for key.
    reference = settings.state_key_prefix + "-reference"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        uninterrupted_state(REDIS_URL, reference, frame, sequence_length=5, limit=EVENTS)
        killed = redis_state(client, settings.state_key_prefix)
        assert len(killed) > 500  # customers and terminals: not an empty comparison
        assert killed == redis_state(client, reference)
    finally:
        delete_keys(client, reference)
        client.close()
    print(
        f"\n{EVENTS:,} events, kills at (published, scored) {kills}: {accounting.records:,} "
        f"records, {accounting.duplicates:,} duplicates, all identical; state equal"
    )
