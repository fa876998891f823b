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
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaProducer

from stream_app import kafka_config
from stream_app.config import Settings, settings_environment
from stream_app.console import auth
from stream_app.console.store import CaseStore
from stream_app.records import Decision, ScoreRecord, iso_utc_millis, parse_label
from tests.kafka_fixtures import Broker, new_settings, read_topic
from training.services.net import LOOPBACK, free_port, wait_for_port

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "correct horse battery"
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
    store = CaseStore(database)
    store.create_schema()
    store.add_user("ann", auth.hash_password(PASSWORD), "analyst", replace=False)
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
    log_path = tmp_path / "console.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "console"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://{LOOPBACK}:{port}"
    try:
        assert wait_for_port(LOOPBACK, port, 60), log_path.read_text()
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"{base}/queue")
                assert page.url.endswith("/login")  # nothing without a login
                page.fill("input[name=username]", "ann")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(f"{base}/queue")
                assert "No case matches" in page.content()

                run_async(publish(settings, alerts(6)))
                published = time.monotonic()
                deadline = published + 30
                while page.locator("tr.case").count() < 6:
                    assert time.monotonic() < deadline, page.content()
                    page.reload()
                queue_s = time.monotonic() - published
                page.screenshot(path=str(artifacts / "console-queue.png"), full_page=True)
                first = page.locator("tr.case a").first
                assert first.inner_text() == "0.650"  # the highest score first
                first.click()
                page.wait_for_url("**/cases/web-5")
                assert "reason 5" in page.content()
                page.click("text=Claim")
                page.check("input[value=fraud]")
                page.fill("textarea[name=note]", "cardholder denies it")
                page.screenshot(path=str(artifacts / "console-case.png"), full_page=True)
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
        print(f"\nalert to queue in the browser: {queue_s:.2f} s; screenshots in {artifacts}")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
