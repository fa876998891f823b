"""The case store: cases opened from alerts, the verdict trail, the label outbox, the
operators' controls (their trail and outbox), the users.

SQLite by default (embedded, nothing to run), PostgreSQL by URL for deployments. Both run
the same tables and the same statements: SQL both dialects accept, written with ``?``
placeholders (psycopg's ``%s`` is substituted), so one code path serves both. Only the
guard that makes the verdict trail append-only is written per dialect (a trigger refusing
UPDATE and DELETE, and TRUNCATE in PostgreSQL); no code here updates or deletes a verdict.

Consistency rests on single conditional statements, which both databases apply atomically:

* an alert (and a scored transaction kept for the timelines) is inserted with
  ``ON CONFLICT (transaction_id) DO NOTHING``, so a redelivered alert is not a second case;
* a claim is ``UPDATE ... WHERE assignee IS NULL OR assignee = me``: of two analysts, one
  gets the row and the other's update matches nothing;
* a verdict updates the case only while the analyst holds it, then appends the verdict and,
  for fraud or legitimate, the ``Label`` to publish (an outbox row) in the same transaction,
  so a verdict is never stored without its label, nor a label sent without its verdict.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from stream_app.errors import ConfigError, FraudStreamError
from stream_app.records import Control, Label, ScoreRecord
from stream_app.scoring.controls import Controls


class StoreError(FraudStreamError):
    """A case store operation that cannot be done as asked (the message says why)."""


class CaseStatus(enum.StrEnum):
    """Where a case stands: waiting for an analyst, for a supervisor, or decided."""

    OPEN = "open"
    ESCALATED = "escalated"
    CLOSED = "closed"


class Outcome(enum.StrEnum):
    """An analyst's verdict on a case. Fraud and legitimate close it and publish a label."""

    FRAUD = "fraud"
    LEGITIMATE = "legitimate"
    ESCALATE = "escalate"


ACTIVE_STATUSES: Final = (CaseStatus.OPEN.value, CaseStatus.ESCALATED.value)
MAX_NOTE_CHARS: Final = 2000

_CASE_COLUMNS: Final = (
    "transaction_id, customer_id, terminal_id, amount, event_time, score, decision, reasons, "
    "model_version, scored_at, opened_at, status, assignee, claimed_at, outcome, closed_at"
)

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS cases (
        transaction_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        amount DOUBLE PRECISION NOT NULL,
        event_time TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        decision TEXT NOT NULL,
        reasons TEXT NOT NULL,
        model_version TEXT NOT NULL,
        scored_at TEXT NOT NULL,
        opened_at DOUBLE PRECISION NOT NULL,
        status TEXT NOT NULL,
        assignee TEXT,
        claimed_at DOUBLE PRECISION,
        outcome TEXT,
        closed_at DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS cases_queue ON cases (status, score DESC, opened_at)",
    "CREATE INDEX IF NOT EXISTS cases_customer ON cases (customer_id, status)",
    "CREATE INDEX IF NOT EXISTS cases_terminal ON cases (terminal_id, status)",
    """CREATE TABLE IF NOT EXISTS verdicts (
        verdict_id TEXT PRIMARY KEY,
        transaction_id TEXT NOT NULL REFERENCES cases (transaction_id),
        outcome TEXT NOT NULL,
        note TEXT NOT NULL,
        analyst TEXT NOT NULL,
        decided_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS verdicts_case ON verdicts (transaction_id, decided_at)",
    "CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts (decided_at)",
    """CREATE TABLE IF NOT EXISTS label_outbox (
        verdict_id TEXT PRIMARY KEY REFERENCES verdicts (verdict_id),
        message_key TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        sent_at DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS label_outbox_pending ON label_outbox (sent_at, created_at)",
    """CREATE TABLE IF NOT EXISTS scores (
        transaction_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL,
        amount DOUBLE PRECISION NOT NULL,
        event_time TEXT NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        decision TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS scores_customer ON scores (customer_id, event_time)",
    "CREATE INDEX IF NOT EXISTS scores_terminal ON scores (terminal_id, event_time)",
    "CREATE INDEX IF NOT EXISTS scores_received ON scores (received_at)",
    """CREATE TABLE IF NOT EXISTS control_changes (
        change_id TEXT PRIMARY KEY,
        control_key TEXT NOT NULL,
        payload TEXT NOT NULL,
        changed_by TEXT NOT NULL,
        changed_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS control_changes_time ON control_changes (changed_at)",
    """CREATE TABLE IF NOT EXISTS control_outbox (
        change_id TEXT PRIMARY KEY REFERENCES control_changes (change_id),
        message_key TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        sent_at DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS control_outbox_pending ON control_outbox (sent_at, created_at)",
    """CREATE TABLE IF NOT EXISTS users (
        username TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
)

_APPEND_ONLY_SQLITE: Final = (
    """CREATE TRIGGER IF NOT EXISTS verdicts_no_update BEFORE UPDATE ON verdicts
       BEGIN SELECT RAISE(ABORT, 'verdicts are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS verdicts_no_delete BEFORE DELETE ON verdicts
       BEGIN SELECT RAISE(ABORT, 'verdicts are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS control_changes_no_update BEFORE UPDATE ON control_changes
       BEGIN SELECT RAISE(ABORT, 'control changes are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS control_changes_no_delete BEFORE DELETE ON control_changes
       BEGIN SELECT RAISE(ABORT, 'control changes are append-only'); END""",
)
_APPEND_ONLY_POSTGRES: Final = (
    """CREATE OR REPLACE FUNCTION fraudstream_verdicts_append_only() RETURNS trigger
       LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'verdicts are append-only'; END $$""",
    """CREATE OR REPLACE TRIGGER verdicts_append_only
       BEFORE UPDATE OR DELETE OR TRUNCATE ON verdicts
       FOR EACH STATEMENT EXECUTE FUNCTION fraudstream_verdicts_append_only()""",
    """CREATE OR REPLACE FUNCTION fraudstream_controls_append_only() RETURNS trigger
       LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'control changes are append-only'; END $$""",
    """CREATE OR REPLACE TRIGGER control_changes_append_only
       BEFORE UPDATE OR DELETE OR TRUNCATE ON control_changes
       FOR EACH STATEMENT EXECUTE FUNCTION fraudstream_controls_append_only()""",
)


@dataclass(frozen=True, slots=True)
class Case:
    """One alert under review, as the queue and the case view show it."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    amount: float
    event_time: str
    score: float
    decision: str
    reasons: tuple[str, ...]
    model_version: str
    scored_at: str
    opened_at: float
    status: CaseStatus
    assignee: str | None
    claimed_at: float | None
    outcome: Outcome | None
    closed_at: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Case:
        """A case from a row selected with ``_CASE_COLUMNS``."""
        return cls(
            transaction_id=row[0],
            customer_id=row[1],
            terminal_id=row[2],
            amount=float(row[3]),
            event_time=row[4],
            score=float(row[5]),
            decision=row[6],
            reasons=tuple(orjson.loads(row[7])),
            model_version=row[8],
            scored_at=row[9],
            opened_at=float(row[10]),
            status=CaseStatus(row[11]),
            assignee=row[12],
            claimed_at=None if row[13] is None else float(row[13]),
            outcome=None if row[14] is None else Outcome(row[14]),
            closed_at=None if row[15] is None else float(row[15]),
        )

    def age_s(self, now_s: float) -> float:
        """Time since the case was opened, or until it was closed."""
        end = self.closed_at if self.closed_at is not None else now_s
        return max(0.0, end - self.opened_at)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One entry of the append-only verdict trail."""

    verdict_id: str
    transaction_id: str
    outcome: Outcome
    note: str
    analyst: str
    decided_at: float


@dataclass(frozen=True, slots=True)
class ScoredTransaction:
    """A transaction from the scores topic, and the case outcome if an analyst decided it."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    amount: float
    event_time: str
    score: float
    decision: str
    outcome: Outcome | None


@dataclass(frozen=True, slots=True)
class RecordedVerdict:
    """What :meth:`CaseStore.record_verdict` did: the verdict, and the case's time to it."""

    verdict: Verdict
    time_to_verdict_s: float
    label: Label | None


@dataclass(frozen=True, slots=True)
class User:
    """A console user; the role is checked on every request."""

    username: str
    password_hash: str
    role: str


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """The queue's filters; None means any. Dates are ``YYYY-MM-DD`` on the event time."""

    status: CaseStatus | None = CaseStatus.OPEN
    decision: str | None = None
    assignee: str | None = None
    unassigned: bool = False
    model_version: str | None = None
    date_from: str | None = None
    date_to: str | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Open and escalated cases, and when the oldest of them was opened (None: no case)."""

    open_cases: int
    escalated_cases: int
    oldest_opened_at: float | None


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """An outbox message (a verdict's label, a control change) stored and not yet
    acknowledged by the broker; ``message_id`` is the verdict's or the change's id, what
    :meth:`CaseStore.mark_labels_sent` and :meth:`CaseStore.mark_controls_sent` take."""

    message_id: str
    key: bytes
    payload: bytes


# The two outboxes: table -> the column naming each message (constants, never input).
_OUTBOX_IDS: Final = {"label_outbox": "verdict_id", "control_outbox": "change_id"}


@dataclass(frozen=True, slots=True)
class ControlChange:
    """One entry of the append-only trail of operators' controls."""

    change_id: str
    control: Control


class _Connection(Protocol):
    def cursor(self) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class CaseStore:
    """Cases, verdicts, labels to publish and users in SQLite or PostgreSQL.

    Thread-safe: each operation takes a connection from a small pool, runs in one
    transaction, and gives the connection back. The web server calls it from its worker
    threads, the consumer through ``asyncio.to_thread``.

    Args:
        url: ``sqlite:///PATH`` or ``postgresql://...``.
    """

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            self._sqlite_path = url.removeprefix("sqlite:///")
            if not self._sqlite_path or self._sqlite_path == ":memory:":
                raise ConfigError(
                    "FRAUDSTREAM_CONSOLE_DATABASE_URL: SQLite needs a file (sqlite:///PATH); "
                    "an in-memory database is not shared between connections"
                )
            Path(self._sqlite_path).parent.mkdir(parents=True, exist_ok=True)
        elif url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
        else:
            raise ConfigError(
                "FRAUDSTREAM_CONSOLE_DATABASE_URL must start with sqlite:/// or postgresql://"
            )
        self._url = url
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    # --- connections ---------------------------------------------------------------------
    def _connect(self) -> _Connection:
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self._sqlite_path, timeout=30.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        import psycopg

        try:
            return psycopg.connect(self._url, connect_timeout=10)
        except psycopg.OperationalError as exc:
            # libpq's message names host and user, never the password
            raise StoreError(f"cannot connect to the case store: {exc}") from None

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        with self._lock:
            if self._closed:
                raise StoreError("the case store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield _Cursor(conn.cursor(), self.dialect)
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:  # a broken connection: drop it; the first error is what matters
                conn.close()
            else:
                self._give_back(conn)
            raise
        self._give_back(conn)

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)

    def create_schema(self) -> None:
        """Create the tables, indexes and append-only guard if missing (idempotent)."""
        guard = _APPEND_ONLY_SQLITE if self.dialect == "sqlite" else _APPEND_ONLY_POSTGRES
        with self._transaction() as cur:
            for statement in (*_SCHEMA, *guard):
                cur.execute_ddl(statement)

    def close(self) -> None:
        """Close every pooled connection; later calls fail."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- alerts --------------------------------------------------------------------------
    def add_alerts(self, records: Sequence[ScoreRecord], now_s: float | None = None) -> int:
        """Open a case per alert not seen before; returns how many were new.

        A transaction id already in the store (a redelivered or replayed alert) is skipped.
        """
        now = time.time() if now_s is None else now_s
        added = 0
        with self._transaction() as cur:
            for r in records:
                cur.execute(
                    f"INSERT INTO cases ({_CASE_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL) "
                    "ON CONFLICT (transaction_id) DO NOTHING",
                    (
                        r.transaction_id,
                        r.customer_id,
                        r.terminal_id,
                        r.amount,
                        r.event_time,
                        r.score,
                        r.decision.value,
                        orjson.dumps(list(r.reasons)).decode(),
                        r.model_version,
                        r.scored_at,
                        now,
                        CaseStatus.OPEN.value,
                    ),
                )
                added += max(cur.rowcount, 0)
        return added

    def add_scores(self, records: Sequence[ScoreRecord], now_s: float | None = None) -> int:
        """Keep scored transactions for the timelines; returns how many were new."""
        now = time.time() if now_s is None else now_s
        added = 0
        with self._transaction() as cur:
            for r in records:
                cur.execute(
                    "INSERT INTO scores (transaction_id, customer_id, terminal_id, amount, "
                    "event_time, score, decision, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (transaction_id) DO NOTHING",
                    (
                        r.transaction_id,
                        r.customer_id,
                        r.terminal_id,
                        r.amount,
                        r.event_time,
                        r.score,
                        r.decision.value,
                        now,
                    ),
                )
                added += max(cur.rowcount, 0)
        return added

    def history(
        self, *, customer_id: str | None = None, terminal_id: str | None = None, limit: int = 50
    ) -> list[ScoredTransaction]:
        """A customer's or a terminal's latest scored transactions, newest first, each with
        the verdict of its case if there is one (the terminal's known frauds)."""
        column, value = (
            ("customer_id", customer_id) if customer_id else ("terminal_id", terminal_id)
        )
        with self._transaction() as cur:
            cur.execute(
                "SELECT s.transaction_id, s.customer_id, s.terminal_id, s.amount, s.event_time, "
                "s.score, s.decision, c.outcome FROM scores s LEFT JOIN cases c "
                f"ON c.transaction_id = s.transaction_id WHERE s.{column} = ? "
                "ORDER BY s.event_time DESC LIMIT ?",
                (value, limit),
            )
            return [
                ScoredTransaction(
                    str(r[0]),
                    str(r[1]),
                    str(r[2]),
                    float(r[3]),
                    str(r[4]),
                    float(r[5]),
                    str(r[6]),
                    None if r[7] is None else Outcome(r[7]),
                )
                for r in cur.fetchall()
            ]

    def prune_scores(self, received_before_s: float) -> int:
        """Forget scored transactions received before the given time; returns how many."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM scores WHERE received_at < ?", (received_before_s,))
            return max(int(cur.rowcount), 0)

    # --- reading -------------------------------------------------------------------------
    def queue(self, filters: QueueFilter, *, limit: int, offset: int = 0) -> tuple[list[Case], int]:
        """Cases matching ``filters``, highest score first, then oldest; and their count."""
        where, params = _where(filters)
        with self._transaction() as cur:
            cur.execute(f"SELECT COUNT(*) FROM cases{where}", params)
            total = int(cur.fetchone()[0])
            cur.execute(
                f"SELECT {_CASE_COLUMNS} FROM cases{where} "
                "ORDER BY score DESC, opened_at ASC, transaction_id ASC LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
            rows = cur.fetchall()
        return [Case.from_row(row) for row in rows], total

    def case(self, transaction_id: str) -> Case | None:
        """The case of a transaction, if an alert opened one."""
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {_CASE_COLUMNS} FROM cases WHERE transaction_id = ?", (transaction_id,)
            )
            row = cur.fetchone()
        return None if row is None else Case.from_row(row)

    def related_cases(self, case: Case, *, limit: int = 20) -> list[Case]:
        """Other open or escalated cases of the same customer or the same terminal."""
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {_CASE_COLUMNS} FROM cases "
                "WHERE (customer_id = ? OR terminal_id = ?) AND transaction_id <> ? "
                "AND status IN (?, ?) ORDER BY event_time DESC LIMIT ?",
                (case.customer_id, case.terminal_id, case.transaction_id, *ACTIVE_STATUSES, limit),
            )
            return [Case.from_row(row) for row in cur.fetchall()]

    def customer_cases(self, customer_id: str, *, limit: int = 50) -> list[Case]:
        """The customer's alerted transactions, any status, newest first (the timeline)."""
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {_CASE_COLUMNS} FROM cases WHERE customer_id = ? "
                "ORDER BY event_time DESC LIMIT ?",
                (customer_id, limit),
            )
            return [Case.from_row(row) for row in cur.fetchall()]

    def verdicts(self, transaction_id: str) -> list[Verdict]:
        """The verdict trail of one case, oldest first."""
        with self._transaction() as cur:
            cur.execute(
                "SELECT verdict_id, transaction_id, outcome, note, analyst, decided_at "
                "FROM verdicts WHERE transaction_id = ? ORDER BY decided_at, verdict_id",
                (transaction_id,),
            )
            return [_verdict(row) for row in cur.fetchall()]

    def recent_verdicts(self, *, limit: int = 200, offset: int = 0) -> list[Verdict]:
        """The verdict trail of every case, newest first (the audit page)."""
        with self._transaction() as cur:
            cur.execute(
                "SELECT verdict_id, transaction_id, outcome, note, analyst, decided_at "
                "FROM verdicts ORDER BY decided_at DESC, verdict_id LIMIT ? OFFSET ?",
                (limit, offset),
            )
            return [_verdict(row) for row in cur.fetchall()]

    def model_versions(self) -> list[str]:
        """Model versions of the cases in the store (the queue's filter choices)."""
        with self._transaction() as cur:
            cur.execute("SELECT DISTINCT model_version FROM cases ORDER BY model_version")
            return [str(row[0]) for row in cur.fetchall()]

    def stats(self) -> QueueStats:
        """Open and escalated case counts and the oldest open time (for the metrics)."""
        with self._transaction() as cur:
            cur.execute(
                "SELECT status, COUNT(*), MIN(opened_at) FROM cases "
                "WHERE status IN (?, ?) GROUP BY status",
                ACTIVE_STATUSES,
            )
            rows = {str(status): (int(n), float(oldest)) for status, n, oldest in cur.fetchall()}
        oldest = [v[1] for v in rows.values()]
        return QueueStats(
            open_cases=rows.get(CaseStatus.OPEN.value, (0, 0.0))[0],
            escalated_cases=rows.get(CaseStatus.ESCALATED.value, (0, 0.0))[0],
            oldest_opened_at=min(oldest) if oldest else None,
        )

    # --- claims and verdicts -------------------------------------------------------------
    def claim(self, transaction_id: str, username: str, *, escalated_too: bool) -> bool:
        """Assign an open case (an escalated one too, for supervisors) to ``username``.

        Returns:
            True if the user now holds the case; False if another user holds it, or it is
            closed (or escalated and ``escalated_too`` is false).
        """
        statuses = ACTIVE_STATUSES if escalated_too else (CaseStatus.OPEN.value,) * 2
        with self._transaction() as cur:
            cur.execute(
                "UPDATE cases SET assignee = ?, claimed_at = ? WHERE transaction_id = ? "
                "AND status IN (?, ?) AND (assignee IS NULL OR assignee = ?)",
                (username, time.time(), transaction_id, *statuses, username),
            )
            return bool(cur.rowcount == 1)

    def claim_next(self, username: str, *, escalated_too: bool) -> str | None:
        """Claim the case at the top of the queue nobody holds ("take next"); its id.

        Another analyst may take the same case between the look and the claim: then the
        next one is tried, a few times, before giving up (None: nothing to take).
        """
        statuses = ACTIVE_STATUSES if escalated_too else (CaseStatus.OPEN.value,) * 2
        for _ in range(5):
            with self._transaction() as cur:
                cur.execute(
                    "SELECT transaction_id FROM cases WHERE status IN (?, ?) "
                    "AND assignee IS NULL ORDER BY score DESC, opened_at ASC, transaction_id "
                    "LIMIT 1",
                    statuses,
                )
                row = cur.fetchone()
            if row is None:
                return None
            if self.claim(str(row[0]), username, escalated_too=escalated_too):
                return str(row[0])
        return None

    def release(self, transaction_id: str, username: str, *, anyone: bool) -> bool:
        """Give a case back to the queue: one's own, or anyone's when ``anyone``."""
        with self._transaction() as cur:
            if anyone:
                cur.execute(
                    "UPDATE cases SET assignee = NULL, claimed_at = NULL "
                    "WHERE transaction_id = ? AND status IN (?, ?) AND assignee IS NOT NULL",
                    (transaction_id, *ACTIVE_STATUSES),
                )
            else:
                cur.execute(
                    "UPDATE cases SET assignee = NULL, claimed_at = NULL "
                    "WHERE transaction_id = ? AND status IN (?, ?) AND assignee = ?",
                    (transaction_id, *ACTIVE_STATUSES, username),
                )
            return bool(cur.rowcount == 1)

    def record_verdict(
        self,
        transaction_id: str,
        outcome: Outcome,
        note: str,
        analyst: str,
        *,
        now_s: float | None = None,
    ) -> RecordedVerdict:
        """Decide a case the analyst holds: update it, append the verdict, queue its label.

        Fraud and legitimate close the case and queue a ``Label`` (is_fraud true or false)
        for the labels topic; escalate hands it back to the queue for a supervisor.

        Raises:
            StoreError: the case does not exist, is closed, or the analyst does not hold it.
        """
        now = time.time() if now_s is None else now_s
        note = note.strip()[:MAX_NOTE_CHARS]
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {_CASE_COLUMNS} FROM cases WHERE transaction_id = ?", (transaction_id,)
            )
            row = cur.fetchone()
            if row is None:
                raise StoreError("no such case")
            case = Case.from_row(row)
            if outcome is Outcome.ESCALATE:
                new_status, new_assignee, closed_at, final = CaseStatus.ESCALATED, None, None, None
            else:
                new_status, new_assignee, closed_at, final = (
                    CaseStatus.CLOSED,
                    analyst,
                    now,
                    outcome.value,
                )
            cur.execute(
                "UPDATE cases SET status = ?, assignee = ?, outcome = ?, closed_at = ? "
                "WHERE transaction_id = ? AND assignee = ? AND status IN (?, ?)",
                (
                    new_status.value,
                    new_assignee,
                    final,
                    closed_at,
                    transaction_id,
                    analyst,
                    *ACTIVE_STATUSES,
                ),
            )
            if cur.rowcount != 1:
                raise StoreError("claim the case first: it is closed or held by someone else")
            verdict = Verdict(uuid.uuid4().hex, transaction_id, outcome, note, analyst, now)
            cur.execute(
                "INSERT INTO verdicts (verdict_id, transaction_id, outcome, note, analyst, "
                "decided_at) VALUES (?, ?, ?, ?, ?, ?)",
                (verdict.verdict_id, transaction_id, outcome.value, note, analyst, now),
            )
            label = None
            if outcome is not Outcome.ESCALATE:
                label = verdict_label(case, outcome, now)
                cur.execute(
                    "INSERT INTO label_outbox (verdict_id, message_key, payload, created_at, "
                    "sent_at) VALUES (?, ?, ?, ?, NULL)",
                    (verdict.verdict_id, case.customer_id, label.model_dump_json(), now),
                )
        return RecordedVerdict(verdict, max(0.0, now - case.opened_at), label)

    def correct_verdict(
        self,
        transaction_id: str,
        outcome: Outcome,
        note: str,
        supervisor: str,
        *,
        now_s: float | None = None,
    ) -> RecordedVerdict:
        """Change a closed case's outcome (fraud to legitimate or back): a new verdict in
        the trail, never an edit of the old one, and a new label whose later
        ``reported_at`` makes the worker apply the correction.

        Raises:
            StoreError: the case is not closed, or already has this outcome, or the
                outcome is not fraud or legitimate.
        """
        if outcome is Outcome.ESCALATE:
            raise StoreError("a correction is fraud or legitimate")
        now = time.time() if now_s is None else now_s
        note = note.strip()[:MAX_NOTE_CHARS]
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {_CASE_COLUMNS} FROM cases WHERE transaction_id = ?", (transaction_id,)
            )
            row = cur.fetchone()
            if row is None:
                raise StoreError("no such case")
            case = Case.from_row(row)
            cur.execute(
                "UPDATE cases SET outcome = ? WHERE transaction_id = ? AND status = ? "
                "AND outcome <> ?",
                (outcome.value, transaction_id, CaseStatus.CLOSED.value, outcome.value),
            )
            if cur.rowcount != 1:
                raise StoreError("only a closed case with another outcome can be corrected")
            verdict = Verdict(uuid.uuid4().hex, transaction_id, outcome, note, supervisor, now)
            cur.execute(
                "INSERT INTO verdicts (verdict_id, transaction_id, outcome, note, analyst, "
                "decided_at) VALUES (?, ?, ?, ?, ?, ?)",
                (verdict.verdict_id, transaction_id, outcome.value, note, supervisor, now),
            )
            label = verdict_label(case, outcome, now)
            cur.execute(
                "INSERT INTO label_outbox (verdict_id, message_key, payload, created_at, "
                "sent_at) VALUES (?, ?, ?, ?, NULL)",
                (verdict.verdict_id, case.customer_id, label.model_dump_json(), now),
            )
        return RecordedVerdict(verdict, max(0.0, now - case.opened_at), label)

    # --- label outbox --------------------------------------------------------------------
    def pending_labels(self, *, limit: int = 500) -> list[PendingMessage]:
        """Labels stored with their verdicts and not yet sent, oldest first."""
        return self._pending("label_outbox", limit)

    def mark_labels_sent(self, verdict_ids: Sequence[str], now_s: float | None = None) -> None:
        """Record that the broker acknowledged these labels."""
        self._mark_sent("label_outbox", verdict_ids, now_s)

    def _pending(self, table: str, limit: int) -> list[PendingMessage]:
        column = _OUTBOX_IDS[table]
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {column}, message_key, payload FROM {table} "
                f"WHERE sent_at IS NULL ORDER BY created_at, {column} LIMIT ?",
                (limit,),
            )
            return [
                PendingMessage(str(i), str(k).encode(), str(p).encode())
                for i, k, p in cur.fetchall()
            ]

    def _mark_sent(self, table: str, ids: Sequence[str], now_s: float | None) -> None:
        column = _OUTBOX_IDS[table]
        now = time.time() if now_s is None else now_s
        with self._transaction() as cur:
            for message_id in ids:
                cur.execute(
                    f"UPDATE {table} SET sent_at = ? WHERE {column} = ? AND sent_at IS NULL",
                    (now, message_id),
                )

    def labelled_verdicts(self) -> list[Label]:
        """Every label the console produced, in verdict order (for a label file export)."""
        with self._transaction() as cur:
            cur.execute("SELECT payload FROM label_outbox ORDER BY created_at, verdict_id")
            return [Label.model_validate_json(str(row[0])) for row in cur.fetchall()]

    # --- operators' controls --------------------------------------------------------------
    def record_control(self, control: Control) -> ControlChange:
        """Append a change to the controls trail and queue it for the controls topic, in
        one transaction: never a change in force without its audit entry, nor the reverse.
        """
        change = ControlChange(uuid.uuid4().hex, control)
        payload = control.to_json().decode()
        changed_at = control.changed_at.timestamp()
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO control_changes (change_id, control_key, payload, changed_by, "
                "changed_at) VALUES (?, ?, ?, ?, ?)",
                (change.change_id, control.key, payload, control.changed_by, changed_at),
            )
            cur.execute(
                "INSERT INTO control_outbox (change_id, message_key, payload, created_at, "
                "sent_at) VALUES (?, ?, ?, ?, NULL)",
                (change.change_id, control.key, payload, changed_at),
            )
        return change

    def control_changes(self, *, limit: int | None = None) -> list[ControlChange]:
        """The controls trail, oldest first (the last ``limit`` changes if given)."""
        with self._transaction() as cur:
            if limit is None:
                cur.execute(
                    "SELECT change_id, payload FROM control_changes ORDER BY changed_at, change_id"
                )
                rows = cur.fetchall()
            else:
                cur.execute(
                    "SELECT change_id, payload FROM control_changes "
                    "ORDER BY changed_at DESC, change_id DESC LIMIT ?",
                    (limit,),
                )
                rows = cur.fetchall()[::-1]
        return [ControlChange(str(c), Control.model_validate_json(str(p))) for c, p in rows]

    def controls_in_force(self) -> Controls:
        """The controls the workers apply: the trail folded the way a worker folds the
        topic (:meth:`stream_app.scoring.controls.Controls.updated`)."""
        controls = Controls()
        for change in self.control_changes():
            controls = controls.updated(change.control)
        return controls

    def pending_controls(self, *, limit: int = 500) -> list[PendingMessage]:
        """Control changes stored and not yet sent, oldest first."""
        return self._pending("control_outbox", limit)

    def mark_controls_sent(self, change_ids: Sequence[str], now_s: float | None = None) -> None:
        """Record that the broker acknowledged these control changes."""
        self._mark_sent("control_outbox", change_ids, now_s)

    # --- users ---------------------------------------------------------------------------
    def add_user(self, username: str, password_hash: str, role: str, *, replace: bool) -> bool:
        """Create a user, or with ``replace`` set the password and role of an existing one.

        Returns:
            False if the user exists and ``replace`` is false (nothing changed).
        """
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO users (username, password_hash, role, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
                (username, password_hash, role, time.time()),
            )
            if cur.rowcount == 1:
                return True
            if not replace:
                return False
            cur.execute(
                "UPDATE users SET password_hash = ?, role = ? WHERE username = ?",
                (password_hash, role, username),
            )
            return True

    def user(self, username: str) -> User | None:
        """A user by name."""
        with self._transaction() as cur:
            cur.execute(
                "SELECT username, password_hash, role FROM users WHERE username = ?", (username,)
            )
            row = cur.fetchone()
        return None if row is None else User(str(row[0]), str(row[1]), str(row[2]))

    def users(self) -> list[User]:
        """Every user, by name."""
        with self._transaction() as cur:
            cur.execute("SELECT username, password_hash, role FROM users ORDER BY username")
            return [User(str(u), str(h), str(r)) for u, h, r in cur.fetchall()]

    def set_password_hash(self, username: str, password_hash: str) -> None:
        """Store a rehashed password (argon2 parameters raised since it was set)."""
        with self._transaction() as cur:
            cur.execute(
                "UPDATE users SET password_hash = ? WHERE username = ?", (password_hash, username)
            )


def verdict_label(case: Case, outcome: Outcome, reported_at_s: float) -> Label:
    """The ``Label`` a fraud or legitimate verdict publishes, in the worker's format.

    It carries the customer, terminal and event time of the scored transaction, which the
    worker checks against what it scored before counting the label.
    """
    return Label(
        transaction_id=case.transaction_id,
        customer_id=case.customer_id,
        terminal_id=case.terminal_id,
        is_fraud=outcome is Outcome.FRAUD,
        event_time=datetime.fromisoformat(case.event_time),
        reported_at=datetime.fromtimestamp(reported_at_s, UTC),
    )


def _verdict(row: Sequence[Any]) -> Verdict:
    return Verdict(
        str(row[0]), str(row[1]), Outcome(row[2]), str(row[3]), str(row[4]), float(row[5])
    )


def _where(f: QueueFilter) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    params: list[Any] = []
    if f.status is not None:
        clauses.append("status = ?")
        params.append(f.status.value)
    if f.decision:
        clauses.append("decision = ?")
        params.append(f.decision)
    if f.unassigned:
        clauses.append("assignee IS NULL")
    elif f.assignee:
        clauses.append("assignee = ?")
        params.append(f.assignee)
    if f.model_version:
        clauses.append("model_version = ?")
        params.append(f.model_version)
    # Event times are ISO-8601 UTC text of one width, so text order is time order.
    if f.date_from:
        clauses.append("event_time >= ?")
        params.append(f.date_from)
    if f.date_to:
        clauses.append("event_time < ?")
        params.append(f.date_to + "T99")  # the whole day: any time on it sorts below
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


class _Cursor:
    """A DB-API cursor taking ``?`` placeholders whichever the database."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._postgres = dialect == "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        if self._postgres:
            sql = sql.replace("?", "%s")  # no statement here holds a literal ? or %
        self._cursor.execute(sql, tuple(params))

    def execute_ddl(self, sql: str) -> None:
        self._cursor.execute(sql)

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())
