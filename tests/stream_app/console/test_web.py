"""The console's pages and actions through the ASGI test client, over a real SQLite store.

Every page and action is tried anonymous (sent to the login page, nothing shown) and with
the wrong role (403); every form without its CSRF token (refused, nothing changed); logins
are rate limited; the session cookie is signed, HttpOnly, Secure and SameSite strict; and an
analyst works a case from the queue to a verdict whose label waits in the outbox.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from stream_app.console import auth
from stream_app.console.app import SESSION_COOKIE, create_app
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.settings import load_console_settings
from stream_app.console.store import CaseStatus, CaseStore, Outcome
from stream_app.errors import ConfigError
from stream_app.records import Decision, ScoreRecord, parse_control, parse_label
from tests.conftest import new_database

PASSWORD = "correct horse battery"
CUSTOMER = "customer-4711"
TERMINAL = "terminal-0815"


class Env:
    def __init__(self, store: CaseStore, metrics: ConsoleMetrics, app: object) -> None:
        self.store = store
        self.metrics = metrics
        self.app = app
        self.woken = 0
        self.controls_woken = 0

    def client(self) -> TestClient:
        # https: the session cookie is Secure, so the client only sends it over HTTPS
        return TestClient(self.app, base_url="https://testserver", follow_redirects=False)  # type: ignore[arg-type]

    def login(self, username: str, password: str = PASSWORD) -> TestClient:
        client = self.client()
        response = post_form(client, "/login", {"username": username, "password": password})
        assert response.status_code == 303, response.text
        return client


def csrf_of(client: TestClient, path: str) -> str:
    page = client.get(path)
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


def post_form(
    client: TestClient, path: str, data: dict[str, str], *, page: str | None = None
) -> httpx.Response:
    """POST a form as a browser would: with the CSRF token of the page showing it."""
    token = csrf_of(client, page or ("/login" if path == "/login" else "/queue"))
    response: httpx.Response = client.post(path, data={**data, "csrf": token})
    return response


def alert(n: int, score: float = 0.8) -> ScoreRecord:
    return ScoreRecord(
        transaction_id=f"tx-{n}",
        customer_id=CUSTOMER,
        terminal_id=TERMINAL,
        amount=123.45,
        event_time=f"2026-03-01T12:00:{n:02d}.000Z",
        score=score,
        decision=Decision.DECLINE,
        reasons=("amount far above the customer's usual",),
        model_version="lstm-1",
        scored_at="2026-03-01T12:00:00.000Z",
    )


@contextlib.contextmanager
def console_env(database_url: str) -> Iterator[Env]:
    """The console's application over a fresh store at ``database_url``, with four users
    (ann and bob analysts, sue supervisor, ada admin) and seven open cases."""
    settings = load_console_settings(
        database_url=database_url,
        secret_key="k" * 40,
        login_max_failures=3,
        page_size=5,
        sla_s=60,
    )
    store = CaseStore(settings.database_url.get_secret_value())
    store.create_schema()
    for name, role in (
        ("ann", "analyst"),
        ("bob", "analyst"),
        ("sue", "supervisor"),
        ("ada", "admin"),
    ):
        store.add_user(name, auth.hash_password(PASSWORD), role, replace=False)
    store.add_alerts([alert(n, score=0.5 + n / 100) for n in range(1, 8)])
    metrics = ConsoleMetrics(CollectorRegistry())
    holder: dict[str, Env] = {}

    def woken() -> None:
        holder["env"].woken += 1

    def control_woken() -> None:
        holder["env"].controls_woken += 1

    app = create_app(store, settings, metrics, on_label=woken, on_control=control_woken)
    holder["env"] = Env(store, metrics, app)
    try:
        yield holder["env"]
    finally:
        store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with console_env(f"sqlite:///{tmp_path / 'console.db'}") as made:
        yield made


PAGES = ["/", "/queue", "/cases/tx-1", "/audit", "/controls", "/users"]
ACTIONS = [
    "/queue/next",
    "/cases/tx-1/claim",
    "/cases/tx-1/release",
    "/cases/tx-1/verdict",
    "/cases/tx-1/correct",
    "/controls/list",
    "/controls/thresholds",
    "/controls/lift",
    "/logout",
]


def test_nothing_is_visible_or_doable_without_login(env: Env) -> None:
    client = env.client()
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
        assert CUSTOMER not in response.text and "tx-1" not in response.text
    token = csrf_of(client, "/login")  # a real token of an anonymous session
    for path in ACTIONS:
        response = client.post(path, data={"csrf": token, "outcome": "fraud", "note": "x"})
        assert response.status_code == 303 and response.headers["location"] == "/login", path
    case = env.store.case("tx-1")
    assert case is not None and case.assignee is None and case.status is CaseStatus.OPEN
    assert client.get("/healthz").text == "ok"


def test_each_role_sees_only_its_pages(env: Env) -> None:
    expected = {
        "ann": {"/queue": 200, "/cases/tx-1": 200, "/audit": 403, "/controls": 403, "/users": 403},
        "sue": {"/queue": 200, "/cases/tx-1": 200, "/audit": 200, "/controls": 200, "/users": 403},
        "ada": {"/queue": 200, "/cases/tx-1": 200, "/audit": 200, "/controls": 200, "/users": 200},
    }
    for user, pages in expected.items():
        client = env.login(user)
        for path, status in pages.items():
            response = client.get(path)
            assert response.status_code == status, (user, path)
            if status == 403:
                assert "needs the" in response.text and CUSTOMER not in response.text
    # an unknown role stored by hand has no rights at all
    env.store.add_user("eve", auth.hash_password(PASSWORD), "intern", replace=False)
    assert env.login("eve").get("/queue").status_code == 403


def test_forms_without_the_sessions_csrf_token_are_refused(env: Env) -> None:
    client = env.login("ann")
    for data in ({}, {"csrf": "forged"}):
        response = client.post("/cases/tx-1/claim", data=data)
        assert response.status_code == 403
    other = env.login("bob")  # bob's token is no good in ann's session
    response = client.post("/cases/tx-1/claim", data={"csrf": csrf_of(other, "/queue")})
    assert response.status_code == 403
    case = env.store.case("tx-1")
    assert case is not None and case.assignee is None
    anonymous = env.client()
    response = anonymous.post("/login", data={"username": "ann", "password": PASSWORD})
    assert response.status_code == 403  # no login without the login form's token


def test_the_session_cookie_is_signed_httponly_secure_and_strict(env: Env) -> None:
    client = env.client()
    response = post_form(client, "/login", {"username": "ann", "password": PASSWORD})
    header = response.headers["set-cookie"].lower()
    assert header.startswith(SESSION_COOKIE)
    for flag in ("httponly", "secure", "samesite=strict", "max-age="):
        assert flag in header
    assert "default-src 'none'" in response.headers["content-security-policy"]
    # a tampered cookie is no session
    forged = TestClient(env.app, base_url="https://testserver", follow_redirects=False)  # type: ignore[arg-type]
    value = client.cookies[SESSION_COOKIE]
    forged.cookies.set(SESSION_COOKIE, value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"))
    assert forged.get("/queue").status_code == 303


def test_logins_are_rate_limited_and_say_nothing_about_users(env: Env) -> None:
    client = env.client()
    wrong = post_form(client, "/login", {"username": "ann", "password": "wrong password!"})
    unknown = post_form(client, "/login", {"username": "nobody", "password": "wrong password!"})
    assert wrong.status_code == unknown.status_code == 401
    assert (
        "wrong user name or password" in wrong.text
        and "wrong user name or password" in unknown.text
    )
    post_form(client, "/login", {"username": "ann", "password": "wrong again!!"})
    # three failures from this address: even the right password is not checked now
    limited = post_form(client, "/login", {"username": "ann", "password": PASSWORD})
    assert limited.status_code == 429 and SESSION_COOKIE not in limited.headers.get(
        "set-cookie", ""
    )
    assert env.metrics.logins.labels("rate_limited")._value.get() == 1
    assert env.metrics.logins.labels("failure")._value.get() == 3


def test_the_rate_limit_counts_per_user_and_per_address_within_its_window() -> None:
    limiter = auth.LoginRateLimiter(max_failures=2, window_s=60)
    for address in ("addr:1", "addr:2"):  # one user guessed from two addresses
        assert limiter.allowed(("user:ann", address), now_s=0)
        limiter.failed(("user:ann", address), now_s=0)
    assert not limiter.allowed(("user:ann", "addr:3"), now_s=1)
    assert limiter.allowed(("user:bob", "addr:3"), now_s=1)
    assert limiter.allowed(("user:ann", "addr:3"), now_s=61)  # the window has passed
    limiter.failed(("user:bob", "addr:1"), now_s=70)
    limiter.failed(("user:bob", "addr:1"), now_s=70)
    limiter.succeeded("user:bob")  # a good password clears the user, not the address
    assert not limiter.allowed(("user:bob", "addr:1"), now_s=71)
    assert limiter.allowed(("user:bob", "addr:9"), now_s=71)


def test_a_changed_password_ends_open_sessions(env: Env) -> None:
    client = env.login("ann")
    assert client.get("/queue").status_code == 200
    env.store.add_user("ann", auth.hash_password("another long password"), "analyst", replace=True)
    assert client.get("/queue").status_code == 303


def test_an_analyst_works_a_case_from_queue_to_label(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ann, bob = env.login("ann"), env.login("bob")
    queue = ann.get("/queue")
    assert queue.status_code == 200
    rows = re.findall(r'href="/cases/(tx-\d+)"', queue.text)
    assert rows == ["tx-7", "tx-6", "tx-5", "tx-4", "tx-3"]  # by score, 5 a page
    assert "Page 1 of 2" in queue.text and 'class="overdue"' not in queue.text
    page2 = ann.get("/queue?page=2")
    assert re.findall(r'href="/cases/(tx-\d+)"', page2.text) == ["tx-2", "tx-1"]
    assert re.findall(r'href="/cases/(tx-\d+)"', ann.get("/queue?decision=review").text) == []

    case_page = ann.get("/cases/tx-7")
    assert CUSTOMER in case_page.text and "amount far above" in case_page.text
    assert "Claim" in case_page.text and 'id="verdict"' not in case_page.text
    assert post_form(ann, "/cases/tx-7/claim", {}).status_code == 303
    # bob cannot take it, nor decide it
    post_form(bob, "/cases/tx-7/claim", {})
    assert "someone else holds it" in bob.get("/cases/tx-7").text
    post_form(bob, "/cases/tx-7/verdict", {"outcome": "fraud", "note": ""})
    case = env.store.case("tx-7")
    assert case is not None and case.assignee == "ann" and case.status is CaseStatus.OPEN
    assert re.findall(r'href="/cases/(tx-\d+)"', ann.get("/queue?assignee=me").text) == ["tx-7"]

    case_page = ann.get("/cases/tx-7")
    assert 'id="verdict"' in case_page.text and "tx-6" in case_page.text  # related open case
    response = post_form(ann, "/cases/tx-7/verdict", {"outcome": "fraud", "note": "stolen card"})
    assert response.status_code == 303 and response.headers["location"] == "/queue"
    case = env.store.case("tx-7")
    assert case is not None and (case.status, case.outcome) == (CaseStatus.CLOSED, Outcome.FRAUD)
    assert "verdict recorded: fraud" in ann.get("/queue").text
    assert env.woken == 1
    (pending,) = env.store.pending_labels()
    label = parse_label(pending.payload)
    assert (label.transaction_id, label.customer_id, label.is_fraud) == ("tx-7", CUSTOMER, True)

    # escalation needs a note, then goes to the supervisors
    post_form(ann, "/cases/tx-6/claim", {})
    post_form(ann, "/cases/tx-6/verdict", {"outcome": "escalate", "note": " "})
    assert env.store.case("tx-6").status is CaseStatus.OPEN  # type: ignore[union-attr]
    post_form(ann, "/cases/tx-6/verdict", {"outcome": "escalate", "note": "large, unusual"})
    assert env.store.case("tx-6").status is CaseStatus.ESCALATED  # type: ignore[union-attr]
    post_form(ann, "/cases/tx-6/claim", {})
    assert env.store.case("tx-6").assignee is None  # type: ignore[union-attr]
    sue = env.login("sue")
    assert "tx-6" in sue.get("/queue?status=escalated").text
    post_form(sue, "/cases/tx-6/claim", {})
    post_form(sue, "/cases/tx-6/verdict", {"outcome": "legitimate", "note": "called customer"})
    audit = sue.get("/audit").text
    assert (
        audit.index("called customer") < audit.index("large, unusual") < audit.index("stolen card")
    )

    assert env.metrics.verdicts.labels("fraud")._value.get() == 1
    assert env.metrics.verdicts.labels("escalate")._value.get() == 1
    assert env.metrics.verdicts.labels("legitimate")._value.get() == 1
    assert env.metrics.time_to_verdict._sum.get() >= 0
    # a supervisor frees a case an analyst holds
    post_form(bob, "/cases/tx-5/claim", {})
    post_form(sue, "/cases/tx-5/release", {})
    assert env.store.case("tx-5").assignee is None  # type: ignore[union-attr]
    # the console's own logs (the test client logs the URLs it requests)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("stream_app"))
    assert "recorded a fraud verdict" in logged
    assert CUSTOMER not in logged and TERMINAL not in logged and "tx-7" not in logged


def test_the_case_view_shows_the_customers_and_terminals_recent_transactions(env: Env) -> None:
    other = alert(9, score=0.1).model_copy(
        update={
            "transaction_id": "tx-9",
            "customer_id": "someone-else",
            "decision": Decision.APPROVE,
        }
    )
    env.store.add_scores([alert(1), alert(2, score=0.3), other])
    fraud = env.store.case("tx-2")
    assert fraud is not None
    env.store.claim("tx-2", "ann", escalated_too=False)
    env.store.record_verdict("tx-2", Outcome.FRAUD, "", "ann")
    page = env.login("bob").get("/cases/tx-1").text
    customer = page[
        page.index('id="customer-history"') : page.index(
            "</table>", page.index('id="customer-history"')
        )
    ]
    assert customer.count("<tr>") == 3  # header, tx-2, tx-1; not someone else's
    assert 'id="customer-chart"' in page
    terminal = page[page.index('id="terminal-history"') :]
    assert "someone-else" in terminal
    assert "1 known fraud among its last 3 scored transactions" in page


def test_take_next_and_a_supervisors_correction(env: Env) -> None:
    ann = env.login("ann")
    response = post_form(ann, "/queue/next", {})
    assert response.headers["location"] == "/cases/tx-7"  # the top score, now ann's
    post_form(ann, "/cases/tx-7/verdict", {"outcome": "fraud", "note": ""})
    # an analyst may not correct; a supervisor may, with a reason
    page = ann.get("/cases/tx-7").text
    assert 'id="correct"' not in page
    wrong_role = post_form(ann, "/cases/tx-7/correct", {"outcome": "legitimate", "note": "x"})
    assert wrong_role.status_code == 403
    sue = env.login("sue")
    assert 'id="correct"' in sue.get("/cases/tx-7").text
    post_form(sue, "/cases/tx-7/correct", {"outcome": "legitimate", "note": ""}, page="/cases/tx-7")
    assert env.store.case("tx-7").outcome is Outcome.FRAUD  # type: ignore[union-attr]
    post_form(sue, "/cases/tx-7/correct", {"outcome": "legitimate", "note": "own purchase"})
    assert env.store.case("tx-7").outcome is Outcome.LEGITIMATE  # type: ignore[union-attr]
    assert [parse_label(p.payload).is_fraud for p in env.store.pending_labels()] == [True, False]
    assert env.woken == 2


def test_pages_escape_what_alerts_carry(env: Env) -> None:
    hostile = alert(30).model_copy(
        update={"transaction_id": "tx-<b>", "reasons": ("<script>alert(1)</script>",)}
    )
    env.store.add_alerts([hostile])
    client = env.login("ann")
    page = client.get("/cases/tx-%3Cb%3E")
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "&lt;script&gt;" in page.text


def test_console_settings_name_the_variable_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FRAUDSTREAM_CONSOLE_DATABASE_URL"):
        load_console_settings(database_url="mysql://u:p@h/db")
    with pytest.raises(ConfigError, match="FRAUDSTREAM_CONSOLE_SECRET_KEY") as raised:
        load_console_settings(secret_key="short-secret")
    assert "short-secret" not in str(raised.value)
    with pytest.raises(ConfigError, match="FRAUDSTREAM_CONSOLE_PORT"):
        load_console_settings(port=0)


def test_add_user_from_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "users.db"
    env = {"FRAUDSTREAM_CONSOLE_DATABASE_URL": f"sqlite:///{db}", "PATH": "/usr/bin:/bin"}

    def run(*args: str, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "stream_app.cli",
                "console",
                "add-user",
                *args,
                "--password-stdin",
            ],
            input=password + "\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    done = run("sue", "--role", "supervisor", password=PASSWORD)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    again = run("sue", "--role", "admin", password=PASSWORD)
    assert again.returncode == 2 and "--replace" in again.stderr
    assert run("sue", "--role", "boss", password=PASSWORD).returncode == 2
    assert run("amy", password="short").returncode == 2
    store = CaseStore(f"sqlite:///{db}")
    try:
        user = store.user("sue")
        assert user is not None and user.role == "supervisor"
        assert auth.verify_password(user.password_hash, PASSWORD)
        assert user.password_hash.startswith("$argon2id$")
        assert store.user("amy") is None
    finally:
        store.close()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_queue_of_10000_open_cases_loads_fast_and_the_gauges_count_it(
    database: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:

    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'console.db'}"
    else:
        url = new_database(request.getfixturevalue("postgres_url"))
    with console_env(url) as env:
        _queue_of_10000(env, database, capsys)


def _queue_of_10000(env: Env, database: str, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    opened = time.time() - 3600
    records = [
        alert(n % 60, score=(n % 997) / 997).model_copy(update={"transaction_id": f"bulk-{n}"})
        for n in range(10_000)
    ]
    env.store.add_alerts(records, now_s=opened)
    client = env.login("ann")
    timings = []
    paths = (
        "/queue",
        "/queue?page=1000",
        "/queue?decision=decline&model_version=lstm-1",
        "/cases/bulk-4242",
    )
    for path in paths:
        start = time.perf_counter()
        response = client.get(path)
        timings.append(time.perf_counter() - start)
        assert response.status_code == 200 and 'class="overdue"' in response.text  # SLA 60 s

    assert "of 2002" in client.get("/queue").text  # 10,007 cases, 5 a page
    with capsys.disabled():
        print(
            f"\nwith 10,007 open cases ({database}): "
            + ", ".join(f"{p} {t * 1000:.0f} ms" for p, t in zip(paths, timings, strict=True)),
        )
    assert max(timings) < 2.0
    env.metrics.refresh(env.store.stats(), now_s=opened + 7200)
    assert env.metrics.cases.labels("open")._value.get() == 10_007
    assert env.metrics.oldest_case_age._value.get() >= 3600


def test_the_reference_tables_list_every_console_metric_and_setting() -> None:
    from stream_app.console.metrics import console_metrics_table
    from stream_app.console.settings import ConsoleSettings, console_settings_table

    metrics = ConsoleMetrics(CollectorRegistry())
    exported = {m.name for m in metrics.registry.collect()}
    table = console_metrics_table()
    assert exported and all(f"`{name}" in table for name in exported)
    assert all(name.startswith("fraudstream_console_") for name in exported)
    settings = console_settings_table()
    assert all(
        f"`FRAUDSTREAM_CONSOLE_{name.upper()}`" in settings for name in ConsoleSettings.model_fields
    )


def test_a_supervisor_sets_and_lifts_controls_each_change_audited_and_queued(env: Env) -> None:
    sue = env.login("sue")
    case_page = sue.get("/cases/tx-1").text
    assert "/controls?subject=terminal&amp;subject_id=terminal-0815" in case_page
    form = {"list": "block", "subject": "terminal", "subject_id": TERMINAL, "note": "skimmer"}
    response = post_form(sue, "/controls/list", form, page="/controls")
    assert response.status_code == 303
    assert "workers apply it within seconds" in sue.get("/controls").text
    thresholds = {
        "model_version": "lstm-1",
        "review_threshold": "0.2",
        "decline_threshold": "0.6",
        "note": "incident 42",
    }
    post_form(sue, "/controls/thresholds", thresholds, page="/controls")
    in_force = env.store.controls_in_force()
    assert set(in_force.entries) == {f"list:terminal:{TERMINAL}", "thresholds:lstm-1"}
    block = in_force.entries[f"list:terminal:{TERMINAL}"]
    assert (block.action, block.changed_by, block.note) == ("block", "sue", "skimmer")
    page = sue.get("/controls").text
    assert TERMINAL in page and "incident 42" in page

    # Refused: no note, an unknown list, thresholds out of order; nothing stored.
    for path, data in (
        ("/controls/list", {**form, "note": " "}),
        ("/controls/list", {**form, "list": "maybe"}),
        ("/controls/thresholds", {**thresholds, "review_threshold": "0.9"}),
        ("/controls/thresholds", {**thresholds, "decline_threshold": "lots"}),
    ):
        post_form(sue, path, data, page="/controls")
        assert "not changed" in sue.get("/controls").text, (path, data)
    assert len(env.store.control_changes()) == 2

    key = f"list:terminal:{TERMINAL}"
    post_form(sue, "/controls/lift", {"key": key, "note": "replaced"}, page="/controls")
    assert set(env.store.controls_in_force().entries) == {"thresholds:lstm-1"}
    changes = env.store.control_changes()
    assert [(c.control.action, c.control.active) for c in changes] == [
        ("block", True),
        ("thresholds", True),
        ("block", False),
    ]
    # Every change waits in the outbox, in the worker's format, keyed for compaction.
    pending = env.store.pending_controls()
    assert [p.key.decode() for p in pending] == [key, "thresholds:lstm-1", key]
    assert parse_control(pending[2].payload) == changes[2].control
    assert env.controls_woken == 3
    # An analyst can neither see nor change them.
    ann = env.login("ann")
    response = ann.post("/controls/list", data={**form, "csrf": csrf_of(ann, "/queue")})
    assert response.status_code == 403 and len(env.store.control_changes()) == 3
