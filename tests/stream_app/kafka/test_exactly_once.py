"""Exactly-once on Apache Kafka: SIGKILLs and a restarted replica publish nothing twice.

Under ``exactly_once`` each micro-batch is one Kafka transaction holding its score, alert
and dead-letter records and its consumer offsets (``send_offsets_to_transaction``). A worker
killed mid-batch leaves an open transaction; the restart, with the same
``FRAUDSTREAM_INSTANCE_ID`` and so the same transactional id, fences the dead producer and
aborts it, and re-processes from the last committed offsets. A ``read_committed`` reader
(what a downstream service runs) then sees every transaction's score exactly once, not
"identical duplicates" as under at-least-once.

Apache Kafka only: the bundled broker (Tansu) has no transactional producer, so there is
nothing to prove on it (its lane runs at-least-once, covered by
``tests/stream_app/worker/test_resilience_sigkill.py``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis

from stream_app.config import Settings
from stream_app.records import Decision, ScoreRecord
from tests.kafka_fixtures import REDIS_URL, Broker, delete_state, new_settings
from tests.resilience_helpers import (
    Accounting,
    BackgroundPublisher,
    Message,
    account,
    read_records,
    redis_state,
    same_record,
    score_records,
    simulated,
    transaction_ids,
)
from training.ops.replay import parse_duration, replay_messages
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]

EVENTS = 50_000
RATE = 1_500.0
KILLS = 3
# Each victim is killed once it has scored this many events: right after a restart, in
# the middle of catching up on a backlog, with a transaction open most of the time.
SCORED_BEFORE_KILL = 2_000
# Labels an hour after their frauds: the terminal windows (which end eight days back)
# read a label a week of event time after it was published, so whichever of the two
# consumers (labels, transactions) recovers first, both runs see the same counters.
LABELS_DELAY = "1h"
SCORED = 'fraudstream_events_total{outcome="scored"}'


def replay_frame() -> pd.DataFrame:
    """1,000 customers over 32 days: 50,000 events are 26 days of event time.

    Dense in event time on purpose, as live traffic is: a restart's backlog (10-15 s of
    this replay, ~20,000 events) then spans ~10 days. After a restart the worker applies
    the backlog's labels before scoring its transactions (``LabelsBacklog.waiting``);
    a backlog spanning more than the terminal ring's slack (64 days of ring minus the
    37 days a 30-day window reaches back) would let those labels recycle ring days still
    read. Live, a backlog spans the outage, seconds or minutes of event time.
    """
    frame = simulated(n_customers=1_000, n_days=32, seed=11)
    assert len(frame) >= EVENTS
    return frame


@pytest.fixture(scope="module")
def replay_data() -> pd.DataFrame:
    """The module's replay (:func:`replay_frame`), simulated once."""
    return replay_frame()


def labelled_stream(frame: pd.DataFrame, settings: Settings, limit: int = EVENTS) -> list[Message]:
    """The first ``limit`` transactions and their fraud labels, in event-time order."""
    return [
        Message(m.topic, m.key, m.value)
        for m in replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            labels_delay=parse_duration(LABELS_DELAY),
            limit=limit,
        )
    ]


@dataclass
class Run:
    """What one replay left: records read back (committed, and all) and the kills."""

    settings: Settings
    scores: list[ScoreRecord]
    alerts: list[ScoreRecord]
    uncommitted_scores: int  # score messages a read_uncommitted reader sees
    kills: list[tuple[int, float]]  # (published, scored by the victim) at each kill
    seconds: float


@pytest.fixture
def deployed(apache_kafka: Broker, served_model: Path) -> Iterator[Callable[..., Settings]]:
    """Factory of the deployed (exactly-once) settings, each with topics, group and Redis
    prefix of its own; the keys of every prefix are deleted when the test ends."""
    made: list[Settings] = []

    def factory(**overrides: Any) -> Settings:
        # new_settings' session timeout (6 s) is the shortest Apache Kafka accepts by
        # default (group.min.session.timeout.ms): a dead member leaves the group soon.
        settings = new_settings(apache_kafka, **{"model_dir": served_model, **overrides})
        assert settings.exactly_once and settings.idempotent_producer
        made.append(settings)
        return settings

    yield factory
    for settings in made:
        delete_state(settings.state_key_prefix)


def replay(settings: Settings, messages: Sequence[Message], log_dir: Path, kills: int) -> Run:
    """Publish ``messages`` at ``RATE`` to one worker, SIGKILLed ``kills`` times meanwhile."""
    ids = transaction_ids(m for m in messages if m.topic == settings.topic_transactions)
    started = time.monotonic()
    publisher = BackgroundPublisher(settings, messages, RATE)
    killed: list[tuple[int, float]] = []
    with contextlib.ExitStack() as stack:
        # Entered before it starts: a worker that fails to start is still stopped.
        worker = stack.enter_context(WorkerProcess(settings, log_dir / "worker-0.log"))
        worker.start()
        publisher.start()
        for k in range(1, kills + 1):
            worker.wait_for(SCORED, SCORED_BEFORE_KILL)
            scored = worker.metric(SCORED) or 0
            worker.kill()
            killed.append((publisher.published, scored))
            worker = stack.enter_context(WorkerProcess(settings, log_dir / f"worker-{k}.log"))
            worker.start()
        publisher.join()
        read_records(settings, settings.topic_scores, ids=ids, timeout_s=120)
        assert worker.terminate() == 0, worker.log()
    seconds = time.monotonic() - started
    return Run(
        settings=settings,
        scores=score_records(read_records(settings, settings.topic_scores)),
        alerts=score_records(read_records(settings, settings.topic_alerts)),
        uncommitted_scores=len(read_records(settings, settings.topic_scores, committed=False)),
        kills=killed,
        seconds=seconds,
    )


def assert_exactly_once(run: Run, ids: Sequence[str]) -> Accounting:
    """One score record per transaction and one alert per review or decline: no more."""
    accounting = account(run.scores, ids)
    accounting.assert_complete()
    assert accounting.scored == len(ids)
    assert accounting.duplicates == 0, f"{accounting.duplicates} duplicate score records"
    alerted = {r.transaction_id: r for r in run.scores if r.decision is not Decision.APPROVE}
    assert alerted, "no alerts: the check below would be empty"
    alert_ids = [a.transaction_id for a in run.alerts]
    assert len(alert_ids) == len(set(alert_ids)), "duplicate alert records"
    assert set(alert_ids) == set(alerted)
    for alert in run.alerts:
        assert same_record(alerted[alert.transaction_id], alert)
    return accounting


def test_three_sigkills_during_a_labelled_replay_publish_every_record_exactly_once(
    deployed: Callable[..., Settings], replay_data: pd.DataFrame, tmp_path: Path
) -> None:
    killed = deployed()
    messages = labelled_stream(replay_data, killed)
    ids = transaction_ids(m for m in messages if m.topic == killed.topic_transactions)
    assert len(ids) == EVENTS
    n_labels = len(messages) - EVENTS
    assert n_labels > 100  # frauds labelled within the replay: the label path is exercised

    (tmp_path / "killed").mkdir()
    run = replay(killed, messages, tmp_path / "killed", kills=KILLS)
    assert len(run.kills) == KILLS
    assert all(published < len(messages) for published, _ in run.kills), run.kills
    accounting = assert_exactly_once(run, ids)

    # The same input, uninterrupted, under another prefix and topics.
    calm = deployed()
    (tmp_path / "calm").mkdir()
    reference = replay(calm, labelled_stream(replay_data, calm), tmp_path / "calm", kills=0)
    assert_exactly_once(reference, ids)

    # Same records (but scored_at), same Redis state, key for key and value for value.
    expected = {r.transaction_id: r for r in reference.scores}
    differ = [
        r.transaction_id for r in run.scores if not same_record(expected[r.transaction_id], r)
    ]
    assert not differ, f"{len(differ)} records differ from the uninterrupted run: {differ[:5]}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        state = redis_state(client, killed.state_key_prefix)
        assert len(state) > 2_000  # customers, terminals, labels: not an empty comparison
        assert state == redis_state(client, calm.state_key_prefix)
    finally:
        client.close()
    aborted = run.uncommitted_scores - len(run.scores)
    print(
        f"\nexactly-once, {EVENTS:,} events + {n_labels:,} labels at {RATE:,.0f}/s, "
        f"SIGKILLs at (published, scored) {run.kills}: {accounting.records:,} committed score "
        f"records, 0 duplicates, {len(run.alerts):,} alerts, 0 duplicates; {aborted:,} score "
        f"records of aborted transactions (visible to read_uncommitted only); state equal to "
        f"the uninterrupted run's ({len(state):,} keys); killed run {run.seconds:.0f} s, "
        f"uninterrupted {reference.seconds:.0f} s"
    )


# Two replicas share 4 partitions; the replay lasts long enough for every phase below.
TWO_REPLICAS_EVENTS = 30_000
TWO_REPLICAS_RATE = 1_000.0


def test_a_restarted_replica_fences_its_old_producer_while_the_other_keeps_going(
    deployed: Callable[..., Settings], replay_data: pd.DataFrame, tmp_path: Path
) -> None:
    """Replica ``a`` is SIGKILLed and restarted, then frozen and replaced while ``b`` runs.

    The restart reuses ``a``'s transactional id: its ``InitProducerId`` bumps the epoch,
    which aborts the dead producer's open transaction and fences it. The frozen phase shows
    the fence on a producer that is still alive (a zombie: a long GC pause, a stalled VM):
    once resumed it is refused by the broker and the worker exits, naming the cause,
    instead of committing a batch its successor re-does.
    """
    a = deployed(topic_partitions=4, instance_id="a")
    b = a.model_copy(update={"instance_id": "b"})
    messages = labelled_stream(replay_data, a, limit=TWO_REPLICAS_EVENTS)
    ids = transaction_ids(m for m in messages if m.topic == a.topic_transactions)
    publisher = BackgroundPublisher(a, messages, TWO_REPLICAS_RATE)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(WorkerProcess(a, tmp_path / "a-0.log"))
        other = stack.enter_context(WorkerProcess(b, tmp_path / "b.log"))
        first.start()
        other.start()
        publisher.start()
        first.wait_for(SCORED, 1_000)
        other.wait_for(SCORED, 500)
        first.kill()
        killed_at = publisher.published
        scored_by_b = other.metric(SCORED) or 0
        # b alone: it takes a's partitions once the session times out, and keeps going.
        other.wait_for(SCORED, scored_by_b + 2_000, timeout_s=60)
        restarted = stack.enter_context(WorkerProcess(a, tmp_path / "a-1.log"))
        restarted.start()
        restarted.wait_for(SCORED, 500)

        # A zombie: frozen mid-stream, replaced by a third process with the same identity.
        assert restarted.process is not None
        restarted.process.send_signal(signal.SIGSTOP)
        frozen_at = publisher.published
        successor = stack.enter_context(WorkerProcess(a, tmp_path / "a-2.log"))
        try:
            successor.start()
        finally:
            restarted.process.send_signal(signal.SIGCONT)
        code = restarted.process.wait(timeout=60)
        assert code != 0, "the fenced zombie went on"
        said = restarted.log_path.read_text(errors="replace")
        assert "this worker's producer was fenced" in said, restarted.log()
        successor.wait_for(SCORED, 500)

        publisher.join()
        assert killed_at < len(messages) and frozen_at < len(messages), "phases after the end"
        read_records(a, a.topic_scores, ids=ids, timeout_s=120)
        assert other.process is not None and other.process.poll() is None, "b stopped"
        assert other.terminate() == 0, other.log()
        assert successor.terminate() == 0, successor.log()

    run = Run(
        settings=a,
        scores=score_records(read_records(a, a.topic_scores)),
        alerts=score_records(read_records(a, a.topic_alerts)),
        uncommitted_scores=len(read_records(a, a.topic_scores, committed=False)),
        kills=[(killed_at, 0.0), (frozen_at, 0.0)],
        seconds=0.0,
    )
    accounting = assert_exactly_once(run, ids)
    aborted = run.uncommitted_scores - len(run.scores)
    print(
        f"\ntwo replicas, {len(ids):,} events: a SIGKILLed at {killed_at:,} published and "
        f"restarted, then frozen at {frozen_at:,} and replaced (the zombie exited {code}, "
        f"fenced); b never stopped; {accounting.records:,} committed score records, "
        f"0 duplicates, 0 lost; {aborted:,} score records of aborted transactions"
    )


def test_a_replica_frozen_past_its_session_commits_nothing_its_successor_redoes(
    deployed: Callable[..., Settings], replay_data: pd.DataFrame, tmp_path: Path
) -> None:
    """Replica ``a`` freezes (SIGSTOP) longer than its session; ``b`` takes its partitions.

    No restart reuses ``a``'s transactional id here, so nothing fences it, and aiokafka's
    ``TxnOffsetCommit`` carries no group generation (KIP-447): the broker would accept the
    batch ``a`` had in flight when it froze, which ``b`` re-does from the last commit. The
    worker must notice on its own that its batch outlived the session and abort it.
    """
    a = deployed(topic_partitions=4, instance_id="a")
    b = a.model_copy(update={"instance_id": "b"})
    messages = labelled_stream(replay_data, a, limit=TWO_REPLICAS_EVENTS)
    ids = transaction_ids(m for m in messages if m.topic == a.topic_transactions)
    publisher = BackgroundPublisher(a, messages, TWO_REPLICAS_RATE)
    with contextlib.ExitStack() as stack:
        frozen = stack.enter_context(WorkerProcess(a, tmp_path / "a.log"))
        other = stack.enter_context(WorkerProcess(b, tmp_path / "b.log"))
        frozen.start()
        other.start()
        publisher.start()
        frozen.wait_for(SCORED, 1_000)
        other.wait_for(SCORED, 500)
        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        frozen_at = publisher.published
        try:
            # b takes a's partitions once a's session has expired, and re-does its batch.
            scored_by_b = other.metric(SCORED) or 0
            other.wait_for(SCORED, scored_by_b + 3_000, timeout_s=60)
            time.sleep(a.consumer_session_timeout_s)
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        # Thawed, a rejoins the group and goes on with a share of the partitions.
        scored_by_a = frozen.metric(SCORED) or 0
        frozen.wait_for(SCORED, scored_by_a + 500, timeout_s=90)
        publisher.join()
        read_records(a, a.topic_scores, ids=ids, timeout_s=120)
        assert frozen.terminate() == 0, frozen.log()
        assert other.terminate() == 0, other.log()

    run = Run(
        settings=a,
        scores=score_records(read_records(a, a.topic_scores)),
        alerts=score_records(read_records(a, a.topic_alerts)),
        uncommitted_scores=len(read_records(a, a.topic_scores, committed=False)),
        kills=[(frozen_at, 0.0)],
        seconds=0.0,
    )
    accounting = assert_exactly_once(run, ids)
    aborted = run.uncommitted_scores - len(run.scores)
    print(
        f"\nreplica a frozen at {frozen_at:,} published past its session, b took over, a "
        f"thawed and rejoined: {accounting.records:,} committed score records, 0 duplicates, "
        f"0 lost; {aborted:,} score records of aborted transactions"
    )
