"""The case store on SQLite and on a real PostgreSQL server the session starts.

Each test runs against both databases with the same code: alerts idempotent by transaction
id, the queue's order, filters and paging, claims that two analysts cannot both win,
verdicts only by the holder, labels queued with fraud/legitimate verdicts in the worker's
``Label`` format, and a verdict trail the database itself refuses to change.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stream_app.console.store import (
    CaseStatus,
    CaseStore,
    Outcome,
    QueueFilter,
    StoreError,
)
from stream_app.records import (
    Control,
    ControlAction,
    ControlSubject,
    Decision,
    ScoreRecord,
    parse_label,
)
from tests.conftest import new_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CaseStore]:
    """An empty case store on each database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cases.db'}"
    else:
        url = new_database(request.getfixturevalue("postgres_url"))
    case_store = CaseStore(url)
    case_store.create_schema()
    case_store.create_schema()  # idempotent: a restarted console runs it again
    try:
        yield case_store
    finally:
        case_store.close()


def alert(
    n: int,
    *,
    score: float = 0.5,
    customer: str = "c1",
    terminal: str = "t1",
    decision: Decision = Decision.REVIEW,
    model: str = "m1",
    day: int = 1,
) -> ScoreRecord:
    return ScoreRecord(
        transaction_id=f"tx{n}",
        customer_id=customer,
        terminal_id=terminal,
        amount=10.0 + n,
        event_time=f"2026-01-{day:02d}T10:00:{n % 60:02d}.000Z",
        score=score,
        decision=decision,
        reasons=(f"reason of {n}",),
        model_version=model,
        scored_at="2026-01-01T10:00:00.000Z",
    )


def test_a_redelivered_alert_is_not_a_second_case(store: CaseStore) -> None:
    assert store.add_alerts([alert(1), alert(2)], now_s=100.0) == 2
    assert store.add_alerts([alert(1), alert(2), alert(3)], now_s=200.0) == 1
    assert store.queue(QueueFilter(), limit=10)[1] == 3
    first = store.case("tx1")
    assert first is not None and first.opened_at == 100.0  # the first delivery's case
    assert first.reasons == ("reason of 1",)


def test_queue_sorts_by_score_then_age_filters_and_pages(store: CaseStore) -> None:
    store.add_alerts([alert(1, score=0.7)], now_s=300.0)
    store.add_alerts([alert(2, score=0.7)], now_s=100.0)
    store.add_alerts(
        [alert(3, score=0.9, decision=Decision.DECLINE, model="m2", day=5), alert(4, score=0.2)],
        now_s=200.0,
    )
    cases, total = store.queue(QueueFilter(), limit=2)
    assert total == 4 and [c.transaction_id for c in cases] == ["tx3", "tx2"]
    cases, _ = store.queue(QueueFilter(), limit=2, offset=2)
    assert [c.transaction_id for c in cases] == ["tx1", "tx4"]

    def only(**kw: Any) -> list[str]:
        return [c.transaction_id for c in store.queue(QueueFilter(**kw), limit=10)[0]]

    assert only(decision="decline") == ["tx3"]
    assert only(model_version="m2") == ["tx3"]
    assert only(date_from="2026-01-05") == ["tx3"]
    assert only(date_to="2026-01-01") == ["tx2", "tx1", "tx4"]
    assert store.claim("tx4", "ann", escalated_too=False)
    assert only(assignee="ann") == ["tx4"]
    assert only(unassigned=True) == ["tx3", "tx2", "tx1"]
    assert store.model_versions() == ["m1", "m2"]
    stats = store.stats()
    assert (stats.open_cases, stats.escalated_cases, stats.oldest_opened_at) == (4, 0, 100.0)


def test_two_analysts_never_hold_one_case(store: CaseStore) -> None:
    store.add_alerts([alert(1)])
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def contend(name: str) -> None:
        barrier.wait()
        if store.claim("tx1", name, escalated_too=False):
            wins.append(name)

    threads = [threading.Thread(target=contend, args=(f"a{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    holder = wins[0]
    case = store.case("tx1")
    assert case is not None and case.assignee == holder
    other = "a0" if holder != "a0" else "a1"
    assert not store.release("tx1", other, anyone=False)
    assert store.claim("tx1", holder, escalated_too=False)  # claiming again is harmless
    assert store.release("tx1", holder, anyone=False)
    assert store.claim("tx1", other, escalated_too=False)
    assert store.release("tx1", "boss", anyone=True)  # a supervisor frees anyone's case


def test_verdicts_need_the_claim_and_queue_labels_in_the_workers_format(
    store: CaseStore,
) -> None:
    t0 = 1_790_000_000.0  # 2026-09: the worker refuses labels reported before 2000
    store.add_alerts([alert(1), alert(2), alert(3)], now_s=t0)
    with pytest.raises(StoreError, match="claim the case first"):
        store.record_verdict("tx1", Outcome.FRAUD, "", "ann")
    with pytest.raises(StoreError, match="no such case"):
        store.record_verdict("nope", Outcome.FRAUD, "", "ann")
    assert store.claim("tx1", "ann", escalated_too=False)
    with pytest.raises(StoreError):
        store.record_verdict("tx1", Outcome.FRAUD, "", "bob")  # bob does not hold it
    recorded = store.record_verdict(
        "tx1", Outcome.FRAUD, " card reported stolen ", "ann", now_s=t0 + 600
    )
    assert recorded.time_to_verdict_s == 600.0
    case = store.case("tx1")
    assert case is not None
    assert (case.status, case.outcome, case.closed_at) == (
        CaseStatus.CLOSED,
        Outcome.FRAUD,
        t0 + 600,
    )
    with pytest.raises(StoreError):  # closed: no second verdict
        store.record_verdict("tx1", Outcome.LEGITIMATE, "", "ann")

    assert store.claim("tx2", "ann", escalated_too=False)
    store.record_verdict("tx2", Outcome.ESCALATE, "unsure", "ann", now_s=t0 + 700)
    case = store.case("tx2")
    assert case is not None and (case.status, case.assignee) == (CaseStatus.ESCALATED, None)
    assert not store.claim("tx2", "ann", escalated_too=False)  # analysts leave it to supervisors
    assert store.claim("tx2", "sue", escalated_too=True)
    store.record_verdict("tx2", Outcome.LEGITIMATE, "customer confirmed", "sue", now_s=t0 + 800)

    trail = store.verdicts("tx2")
    assert [(v.outcome, v.analyst, v.note) for v in trail] == [
        (Outcome.ESCALATE, "ann", "unsure"),
        (Outcome.LEGITIMATE, "sue", "customer confirmed"),
    ]
    assert [v.transaction_id for v in store.recent_verdicts()] == ["tx2", "tx2", "tx1"]

    pending = store.pending_labels()
    assert len(pending) == 2  # fraud and legitimate; the escalation has none
    labels = [parse_label(p.payload) for p in pending]  # the worker's own parser accepts them
    assert [(lb.transaction_id, lb.is_fraud) for lb in labels] == [("tx1", True), ("tx2", False)]
    assert all(p.key == b"c1" for p in pending)  # keyed by customer, like every label
    first = labels[0]
    assert (first.customer_id, first.terminal_id) == ("c1", "t1")
    assert first.event_time.isoformat() == "2026-01-01T10:00:01+00:00"
    assert first.reported_at_s == t0 + 600
    store.mark_labels_sent([pending[0].message_id])
    assert [p.message_id for p in store.pending_labels()] == [pending[1].message_id]
    assert [lb.transaction_id for lb in store.labelled_verdicts()] == ["tx1", "tx2"]
    stats = store.stats()
    assert (stats.open_cases, stats.escalated_cases) == (1, 0)


def test_the_verdict_trail_cannot_be_changed_even_with_sql(store: CaseStore) -> None:
    store.add_alerts([alert(1)])
    store.claim("tx1", "ann", escalated_too=False)
    store.record_verdict("tx1", Outcome.FRAUD, "note", "ann")
    for statement in ("UPDATE verdicts SET note = 'forged'", "DELETE FROM verdicts"):
        with pytest.raises(Exception, match="append-only"), store._transaction() as cur:
            cur.execute(statement)
    assert [v.note for v in store.verdicts("tx1")] == ["note"]


def test_the_controls_trail_cannot_be_changed_and_folds_like_the_worker(store: CaseStore) -> None:
    at = datetime(2026, 11, 30, 12, tzinfo=UTC)
    entries = [
        Control(action=ControlAction.BLOCK, active=True, subject=ControlSubject.TERMINAL,
                subject_id="t1", changed_by="sue", changed_at=at, note="skimmer"),
        Control(action=ControlAction.ALLOW, active=True, subject=ControlSubject.CUSTOMER,
                subject_id="c1", changed_by="sue", changed_at=at + timedelta(minutes=1)),
        Control(action=ControlAction.BLOCK, active=False, subject=ControlSubject.TERMINAL,
                subject_id="t1", changed_by="ada", changed_at=at + timedelta(minutes=2)),
    ]  # fmt: skip
    for control in entries:
        store.record_control(control)
    assert list(store.controls_in_force().entries) == ["list:customer:c1"]
    pending = store.pending_controls()
    assert len(pending) == 3
    store.mark_controls_sent([pending[0].message_id])
    assert [p.message_id for p in store.pending_controls()] == [p.message_id for p in pending[1:]]
    for statement in ("UPDATE control_changes SET changed_by = 'x'", "DELETE FROM control_changes"):
        with pytest.raises(Exception, match="append-only"), store._transaction() as cur:
            cur.execute(statement)
    assert [c.control for c in store.control_changes()] == entries


def test_related_cases_and_the_customers_timeline(store: CaseStore) -> None:
    store.add_alerts(
        [
            alert(1, customer="c1", terminal="t1"),
            alert(2, customer="c1", terminal="t9"),
            alert(3, customer="c7", terminal="t1"),
            alert(4, customer="c8", terminal="t8"),
        ]
    )
    case = store.case("tx1")
    assert case is not None
    assert sorted(c.transaction_id for c in store.related_cases(case)) == ["tx2", "tx3"]
    assert [c.transaction_id for c in store.customer_cases("c1")] == ["tx2", "tx1"]


def test_users_are_created_once_unless_replaced(store: CaseStore) -> None:
    assert store.add_user("ann", "h1", "analyst", replace=False)
    assert not store.add_user("ann", "h2", "admin", replace=False)
    user = store.user("ann")
    assert user is not None and (user.password_hash, user.role) == ("h1", "analyst")
    assert store.add_user("ann", "h2", "admin", replace=True)
    user = store.user("ann")
    assert user is not None and (user.password_hash, user.role) == ("h2", "admin")
    assert store.user("nobody") is None


def test_sqlite_needs_a_file(tmp_path: Path) -> None:
    from stream_app.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a file"):
        CaseStore("sqlite:///:memory:")
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        CaseStore("mysql://x")
    assert sqlite3.sqlite_version_info >= (3, 24)  # ON CONFLICT DO NOTHING


def test_scored_transactions_make_the_timelines_with_known_frauds(store: CaseStore) -> None:
    scores = [
        alert(1, customer="c1", terminal="t1"),
        alert(2, customer="c1", terminal="t2"),
        alert(3, customer="c2", terminal="t1"),
    ]
    assert store.add_scores(scores, now_s=100.0) == 3
    assert store.add_scores(scores[:1], now_s=200.0) == 0  # redelivered: kept once
    store.add_alerts([scores[2]])
    store.claim("tx3", "ann", escalated_too=False)
    store.record_verdict("tx3", Outcome.FRAUD, "", "ann")
    customer = store.history(customer_id="c1")
    assert [(s.transaction_id, s.terminal_id) for s in customer] == [("tx2", "t2"), ("tx1", "t1")]
    terminal = store.history(terminal_id="t1")
    assert [(s.transaction_id, s.outcome) for s in terminal] == [
        ("tx3", Outcome.FRAUD),
        ("tx1", None),
    ]
    store.add_scores([alert(4, customer="c1")], now_s=500.0)
    assert store.prune_scores(received_before_s=300.0) == 3
    assert [s.transaction_id for s in store.history(customer_id="c1")] == ["tx4"]


def test_take_next_claims_the_top_free_case(store: CaseStore) -> None:
    store.add_alerts([alert(1, score=0.9), alert(2, score=0.8), alert(3, score=0.7)])
    assert store.claim("tx1", "bob", escalated_too=False)
    assert store.claim_next("ann", escalated_too=False) == "tx2"  # tx1 is bob's
    assert store.claim_next("cat", escalated_too=False) == "tx3"
    assert store.claim_next("dan", escalated_too=False) is None


def test_a_correction_is_a_new_verdict_and_a_new_label(store: CaseStore) -> None:
    t0 = 1_790_000_000.0
    store.add_alerts([alert(1)], now_s=t0)
    with pytest.raises(StoreError, match="closed case"):
        store.correct_verdict("tx1", Outcome.LEGITIMATE, "open still", "sue")
    store.claim("tx1", "ann", escalated_too=False)
    store.record_verdict("tx1", Outcome.FRAUD, "looked stolen", "ann", now_s=t0 + 10)
    with pytest.raises(StoreError, match="another outcome"):
        store.correct_verdict("tx1", Outcome.FRAUD, "same again", "sue")
    with pytest.raises(StoreError):
        store.correct_verdict("tx1", Outcome.ESCALATE, "", "sue")
    store.correct_verdict(
        "tx1", Outcome.LEGITIMATE, "customer's own purchase", "sue", now_s=t0 + 99
    )
    case = store.case("tx1")
    assert case is not None and (case.status, case.outcome) == (
        CaseStatus.CLOSED,
        Outcome.LEGITIMATE,
    )
    assert [(v.outcome, v.analyst) for v in store.verdicts("tx1")] == [
        (Outcome.FRAUD, "ann"),
        (Outcome.LEGITIMATE, "sue"),
    ]
    labels = [parse_label(p.payload) for p in store.pending_labels()]
    # the worker applies the latest by reported_at: the correction
    assert [(lb.is_fraud, lb.reported_at_s) for lb in labels] == [(True, t0 + 10), (False, t0 + 99)]
