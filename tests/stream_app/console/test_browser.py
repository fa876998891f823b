"""The console in a real browser: Debian's Chromium, headless, driven by Playwright.

``fraudstream console`` runs as a process against the bundled broker; alerts published on
the alerts topic fill the queue the browser shows; an analyst logs in, opens the top case,
claims it and marks it fraud; the label arrives on the labels topic. Screenshots of the
queue and the case are written to ``FRAUDSTREAM_TEST_ARTIFACTS`` (default: the test's
temporary folder).

Needs ``playwright`` (pip; no browser download: the system Chromium is used) and the
``chromium`` Debian package; without them the test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytest
from aiokafka import AIOKafkaProducer

from stream_app.config import Settings, settings_environment
from stream_app.console import auth
from stream_app.console.store import CaseStore
from stream_app.kafka import config as kafka_config
from stream_app.models.scorer import OnnxScorer
from stream_app.records import Decision, ScoreRecord, iso_utc_millis, parse_label
from tests.conftest import new_database
from tests.kafka_fixtures import Broker, Dataset, new_settings, read_topic
from tests.resilience_helpers import (
    BackgroundPublisher,
    Message,
    read_records,
    score_records,
    transaction_messages,
)
from tests.resilience_helpers import (
    publish as publish_messages,
)
from training.ops.replay import replay_order
from training.ops.services.net import LOOPBACK, free_port, wait_for_port
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "correct horse battery"
REPLAYED = 1500  # transactions replayed through the worker
REPLAY_RATE = 300.0  # a second: slow enough to watch the queue fill
PAST_DELAY = pd.Timedelta(days=7, hours=1)  # the terminal features' label delay, and an hour
T = TypeVar("T")


def alerts(count: int) -> list[ScoreRecord]:
    now = time.time()
    return [
        ScoreRecord(
            transaction_id=f"web-{n}",
            customer_id=f"cust-{n % 2}",
            terminal_id="term-1",
            amount=50.0 + n,
            event_time=iso_utc_millis(now - 300 + n),
            score=0.6 + n / 100,
            decision=Decision.DECLINE if n % 2 else Decision.REVIEW,
            reasons=(f"reason {n}: amount above the customer's usual",),
            model_version="lstm-web",
            scored_at=iso_utc_millis(now),
        )
        for n in range(count)
    ]


async def publish(settings: Settings, records: list[ScoreRecord]) -> None:
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(
                settings.topic_alerts, record.to_json(), key=record.customer_id.encode()
            )
    finally:
        await producer.stop()


@contextlib.contextmanager
def console_process(
    settings: Settings, database: str, users: dict[str, str], work_dir: Path
) -> Iterator[str]:
    """``fraudstream console`` as a process over ``database`` with ``users`` (name: role);
    yields its base URL, and checks it stops cleanly on SIGTERM."""
    store = CaseStore(database)
    store.create_schema()
    for name, role in users.items():
        store.add_user(name, auth.hash_password(PASSWORD), role, replace=False)
    store.close()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")},
        **settings_environment(settings),
        "FRAUDSTREAM_CONSOLE_DATABASE_URL": database,
        "FRAUDSTREAM_CONSOLE_PORT": str(port),
        "FRAUDSTREAM_CONSOLE_METRICS_PORT": "0",
        "FRAUDSTREAM_CONSOLE_SECRET_KEY": "b" * 40,
        # the session cookie stays Secure (the default): Chromium keeps Secure cookies over
        # plain HTTP on the loopback address, which it counts as a trustworthy origin
    }
    log_path = work_dir / "console.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "console"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_for_port(LOOPBACK, port, 60), log_path.read_text()
        yield f"http://{LOOPBACK}:{port}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def log_in(page: Any, base: str, username: str) -> None:
    """Log in through the login form and land on the queue."""
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/queue")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end in a thread of its own: Playwright's sync API keeps an
    event loop running in the test's thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=120)


def test_an_analyst_marks_a_case_fraud_in_chromium(bundled_broker: Broker, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium")
    artifacts = Path(os.environ.get("FRAUDSTREAM_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    settings = new_settings(bundled_broker)
    database = f"sqlite:///{tmp_path / 'console.db'}"
    with console_process(settings, database, {"ann": "analyst"}, tmp_path) as base:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(f"{base}/queue")
                assert page.url.endswith("/login")  # nothing without a login
                log_in(page, base, "ann")
                assert "No case matches" in page.content()

                run_async(publish(settings, alerts(6)))
                published = time.monotonic()
                deadline = published + 30
                while page.locator("tr.case").count() < 6:
                    assert time.monotonic() < deadline, page.content()
                    page.reload()
                queue_s = time.monotonic() - published
                first = page.locator("tr.case a").first
                assert first.inner_text() == "0.650"  # the highest score first
                first.click()
                page.wait_for_url("**/cases/web-5")
                assert "reason 5" in page.content()
                page.click("text=Claim")
                page.check("input[value=fraud]")
                page.fill("textarea[name=note]", "cardholder denies it")
                page.click("text=Record verdict")
                page.wait_for_url(f"{base}/queue")
                assert "verdict recorded: fraud" in page.content()
                assert page.locator("tr.case").count() == 5  # the closed case left the queue
            finally:
                browser.close()
        labels = run_async(read_topic(settings, settings.topic_labels, until=1))
        assert len(labels) == 1
        label = parse_label(labels[0].value)
        assert (label.transaction_id, label.is_fraud) == ("web-5", True)
        print(f"\nalert to queue in the browser: {queue_s:.2f} s")


def probe(frame: pd.DataFrame, n: int, terminal_id: Any, at: pd.Timestamp) -> pd.DataFrame:
    """The ``n``-th probe: one transaction of a customer with no history (ids past the
    table's), at ``terminal_id``; its score moves with the terminal's risk features."""
    row = frame.iloc[[0]].copy()
    row["TRANSACTION_ID"] = frame["TRANSACTION_ID"].max() + n
    row["CUSTOMER_ID"] = frame["CUSTOMER_ID"].max() + n
    row["TERMINAL_ID"] = terminal_id
    row["TX_DATETIME"] = at
    row["TX_AMOUNT"] = 42.0
    row["TX_FRAUD"] = 0
    return row.reset_index(drop=True)


def probe_message(settings: Settings, row: pd.DataFrame) -> Message:
    (message,) = transaction_messages(row, settings)
    return message


def test_verdicts_and_blocks_close_the_loop_through_the_real_worker_in_chromium(
    bundled_broker: Broker,
    postgres_url: str,
    served_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    """Replay through the real worker; the queue fills; an analyst marks the top case fraud;
    the next transaction at its terminal is scored with that fraud in the terminal's risk
    features (equal to the offline reference with that one label, unlike the reference
    without it); a supervisor blocks the terminal and the next transaction there is declined,
    its reason naming the block. PostgreSQL, Redis, the bundled broker, Chromium: all real.
    """
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium")
    artifacts = Path(os.environ.get("FRAUDSTREAM_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    settings = new_settings(bundled_broker, model_dir=served_model)
    order = replay_order(small_transactions.frame)[:REPLAYED]
    replayed = small_transactions.frame.iloc[order].reset_index(drop=True)
    messages = transaction_messages(replayed, settings)
    database = new_database(postgres_url)
    users = {"ann": "analyst", "sue": "supervisor"}
    with (
        WorkerProcess(settings, tmp_path / "worker.log").start() as worker,
        console_process(settings, database, users, tmp_path) as base,
        sync_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            log_in(page, base, "ann")
            replay = BackgroundPublisher(settings, messages, REPLAY_RATE).start()
            seen: list[int] = []  # cases in the queue at each reload, during the replay
            while replay.published < len(messages):
                page.reload()
                seen.append(_cases_in_queue(page))
                time.sleep(0.5)
            replay.join()
            worker.wait_for("fraudstream_offsets_committed_total", len(messages), 120)
            alerts_sent = worker.metric('fraudstream_alerts_total{decision="review"}') or 0
            alerts_sent += worker.metric('fraudstream_alerts_total{decision="decline"}') or 0
            deadline = time.monotonic() + 30
            while _cases_in_queue(page) < alerts_sent:
                assert time.monotonic() < deadline, page.content()
                page.reload()
            assert any(0 < n < alerts_sent for n in seen), seen  # it filled during the replay
            page.screenshot(path=str(artifacts / "console-queue.png"))

            page.locator("tr.case a").first.click()
            page.wait_for_url("**/cases/**")
            case_id = page.url.rsplit("/", 1)[1]
            page.click("text=Claim")
            page.check("input[value=fraud]")
            page.fill("textarea[name=note]", "cardholder denies it")
            page.screenshot(path=str(artifacts / "console-case.png"))
            page.click("text=Record verdict")
            page.wait_for_url(f"{base}/queue")
            assert "verdict recorded: fraud" in page.content()

            labels = run_async(read_topic(settings, settings.topic_labels, until=1))
            label = parse_label(labels[0].value)
            assert (label.transaction_id, label.is_fraud) == (case_id, True)
            worker.wait_for('fraudstream_labels_total{outcome="fraud"}', 1, 30)

            # The next transaction at that terminal, past the label delay: its terminal
            # risk features count the fraud.
            case = replayed[replayed["TRANSACTION_ID"].astype(str) == case_id].iloc[0]
            terminal = str(case["TERMINAL_ID"])
            at = case["TX_DATETIME"] + PAST_DELAY
            first_probe = probe(replayed, 1, case["TERMINAL_ID"], at)
            first_id = str(first_probe["TRANSACTION_ID"].iloc[0])
            publish_messages(settings, [probe_message(settings, first_probe)])

            # A supervisor blocks the terminal from the case, and the next one is declined.
            page.click("form[action='/logout'] button")
            log_in(page, base, "sue")
            page.goto(f"{base}/cases/{case_id}")
            page.click("text=block or allow the terminal")
            page.wait_for_url("**/controls?**")
            assert page.input_value("input[name=subject_id]") == terminal
            page.fill("#add-list-entry textarea[name=note]", "skimmer reported by the acquirer")
            page.click("text=Add to the list")
            page.wait_for_url(f"{base}/controls")
            assert "workers apply it within seconds" in page.content()
            blocked_at = time.monotonic()
            page.screenshot(path=str(artifacts / "console-controls.png"))
            worker.wait_for('fraudstream_controls_in_force{kind="block_terminal"}', 1, 30)
            in_force_s = time.monotonic() - blocked_at
            second_probe = probe(replayed, 2, case["TERMINAL_ID"], at + pd.Timedelta(minutes=1))
            second_id = str(second_probe["TRANSACTION_ID"].iloc[0])
            publish_messages(settings, [probe_message(settings, second_probe)])
            worker.wait_for("fraudstream_offsets_committed_total", len(messages) + 2, 60)
            # Declined, so an alert: its case opens with the block as its first reason.
            deadline = time.monotonic() + 30
            while page.goto(f"{base}/cases/{second_id}").status == 404:
                assert time.monotonic() < deadline, page.content()
                time.sleep(0.2)
            assert "terminal on block list since" in page.content()
            page.screenshot(path=str(artifacts / "console-blocked-case.png"))
        finally:
            browser.close()
        assert worker.terminate() == 0, worker.log()

    records = {
        r.transaction_id: r
        for r in score_records(
            read_records(settings, settings.topic_scores, ids=[first_id, second_id])
        )
    }
    # Offline reference: the replayed transactions with only the analyst's verdict known.
    scorer = OnnxScorer(served_model)
    labelled = replayed.assign(TX_FRAUD=(replayed["TRANSACTION_ID"].astype(str) == case_id))
    unlabelled = replayed.assign(TX_FRAUD=0)
    with_label = score_table(pd.concat([labelled, first_probe], ignore_index=True), scorer)
    without = score_table(pd.concat([unlabelled, first_probe], ignore_index=True), scorer)
    expected = float(with_label.table["score"].iloc[-1])
    unaware = float(without.table["score"].iloc[-1])
    print(
        f"\nprobe at the terminal: worker {records[first_id].score:.6f}, offline with the "
        f"verdict {expected:.6f}, without it {unaware:.6f}; block in force {in_force_s:.2f} s "
        f"after the click; screenshots in {artifacts}"
    )
    assert records[first_id].score == pytest.approx(expected, abs=1e-5)
    assert abs(expected - unaware) > 1e-4  # the verdict moved the terminal's risk features
    blocked = records[second_id]
    assert blocked.decision is Decision.DECLINE
    assert blocked.reasons[0].startswith("terminal on block list since ")
    assert blocked.reasons[0].endswith(", by sue: skimmer reported by the acquirer")


def _cases_in_queue(page: Any) -> int:
    """Cases the queue page counts (all its pages), from its heading."""
    match = re.search(r"Cases <small>\((\d+)\)</small>", page.content())
    return int(match.group(1)) if match else 0
