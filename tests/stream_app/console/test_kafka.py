"""The console against a real broker (the bundled one): alerts in, labels out.

The alerts consumer opens one case per alert (a redelivered alert is not a second case, an
invalid record is skipped and counted) and commits only after the store wrote them; the
whole service (its lifespan running the consumer and the label publisher) takes an alert
from the topic to the queue page, and an analyst's verdict to the labels topic, where the
worker's own parser reads it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from stream_app.config import Settings
from stream_app.console import auth
from stream_app.console.ingest import AlertIngest, console_group_id
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.outbox import label_publisher
from stream_app.console.service import build
from stream_app.console.settings import load_console_settings
from stream_app.console.store import CaseStore, Outcome, QueueFilter
from stream_app.kafka import config as kafka_config
from stream_app.records import Decision, ScoreRecord, iso_utc_millis, parse_label
from tests.kafka_fixtures import Broker, new_settings, read_topic

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"


def alert(n: int, *, customer: str = "c-1", score: float = 0.9) -> ScoreRecord:
    now = time.time()
    return ScoreRecord(
        transaction_id=f"tx-{n}",
        customer_id=customer,
        terminal_id="t-1",
        amount=99.0,
        event_time=iso_utc_millis(now - 60),
        score=score,
        decision=Decision.DECLINE,
        reasons=("terminal with recent frauds",),
        model_version="m-1",
        scored_at=iso_utc_millis(now),
    )


async def publish(settings: Settings, values: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(settings.topic_alerts, value, key=key)
    finally:
        await producer.stop()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def committed_and_end(settings: Settings) -> tuple[int, int]:
    """The console group's committed offsets and the topic's end offsets, summed.

    Asked until they agree, for a few seconds: a group coordinator the asking consumer has
    just looked up may not answer at once (Apache Kafka: GroupCoordinatorNotAvailable).
    """
    consumer = AIOKafkaConsumer(
        **kafka_config.client_kwargs(settings), group_id=console_group_id(settings)
    )
    await consumer.start()
    try:
        # the topic as ensure_topics made it (a consumer that subscribes to nothing may not
        # have the topic in its metadata yet)
        partitions = [
            TopicPartition(settings.topic_alerts, p) for p in range(settings.topic_partitions)
        ]
        end = sum((await consumer.end_offsets(partitions)).values())
        deadline = time.monotonic() + 15
        while True:
            committed = sum([await consumer.committed(tp) or 0 for tp in partitions])
            if committed == end or time.monotonic() > deadline:
                return committed, end
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


async def test_alerts_open_cases_once_and_are_committed_after_the_store(
    bundled_broker: Broker, tmp_path: Path
) -> None:
    settings = new_settings(bundled_broker)
    await kafka_config.ensure_topics(settings)
    store = CaseStore(f"sqlite:///{tmp_path / 'cases.db'}")
    store.create_schema()
    metrics = ConsoleMetrics(CollectorRegistry())
    first, second = alert(1), alert(2, customer="c-2", score=0.7)
    await publish(
        settings,
        [
            (b"c-1", first.to_json()),
            (b"c-2", second.to_json()),
            (b"c-1", first.to_json()),  # redelivered
            (b"c-9", b'{"transaction_id": "tx-9", "score": "high"}'),  # no ScoreRecord
        ],
    )
    ingest = AlertIngest(settings, store, metrics)
    task = asyncio.create_task(ingest.run())
    try:
        await wait_until(lambda: metrics.alerts.labels("invalid")._value.get() == 1)
        await wait_until(
            lambda: (
                metrics.alerts.labels("opened")._value.get()
                + metrics.alerts.labels("duplicate")._value.get()
                == 3
            )
        )
    finally:
        ingest.stop()
        await asyncio.wait_for(task, 30)
    cases, total = store.queue(QueueFilter(), limit=10)
    assert total == 2 and [c.transaction_id for c in cases] == ["tx-1", "tx-2"]
    assert metrics.alerts.labels("opened")._value.get() == 2
    assert metrics.alerts.labels("duplicate")._value.get() == 1
    committed, end = await committed_and_end(settings)
    assert committed == end == 4

    # a restarted consumer starts after the committed batch: nothing is read twice
    metrics2 = ConsoleMetrics(CollectorRegistry())
    await publish(settings, [(b"c-3", alert(3, customer="c-3").to_json())])
    ingest = AlertIngest(settings, store, metrics2)
    task = asyncio.create_task(ingest.run())
    try:
        await wait_until(lambda: metrics2.alerts.labels("opened")._value.get() == 1)
    finally:
        ingest.stop()
        await asyncio.wait_for(task, 30)
    assert metrics2.alerts.labels("duplicate")._value.get() == 0
    assert store.queue(QueueFilter(), limit=10)[1] == 3
    store.close()


async def _serve_one_case(settings: Settings, database_url: str) -> dict[str, float]:
    """The service end to end; returns the measured delays."""
    console = load_console_settings(database_url=database_url, secret_key="s" * 40)
    app, store = build(settings, console)
    store.add_user("ann", auth.hash_password(PASSWORD), "analyst", replace=False)
    figures: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    def scenario() -> None:
        with TestClient(app, base_url="https://testserver", follow_redirects=False) as client:
            login = client.get("/login")
            token = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)  # type: ignore[union-attr]
            client.post("/login", data={"username": "ann", "password": PASSWORD, "csrf": token})

            def until_queued(record: ScoreRecord) -> str:
                asyncio.run_coroutine_threadsafe(
                    publish(settings, [(record.customer_id.encode(), record.to_json())]), loop
                ).result(30)
                deadline = time.monotonic() + 30
                while f"/cases/{record.transaction_id}" not in (page := client.get("/queue")).text:
                    assert time.monotonic() < deadline, page.text
                    time.sleep(0.02)
                return str(page.text)

            # the first alert also waits for the consumer to join its group
            until_queued(alert(41, customer="c-0", score=0.5))
            published = time.monotonic()
            page_text = until_queued(alert(42))
            figures["alert_to_queue_s"] = time.monotonic() - published
            token = re.search(r'name="csrf" value="([^"]+)"', page_text).group(1)  # type: ignore[union-attr]
            # the scores topic fills the customer's timeline on the case page
            earlier = alert(40, score=0.05).model_copy(update={"decision": Decision.APPROVE})

            async def publish_scores() -> None:
                producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
                await producer.start()
                try:
                    for record in (earlier, alert(42)):
                        await producer.send_and_wait(
                            settings.topic_scores, record.to_json(), key=b"c-1"
                        )
                finally:
                    await producer.stop()

            asyncio.run_coroutine_threadsafe(publish_scores(), loop).result(30)
            deadline = time.monotonic() + 30
            # both scores: the one before, and this one
            while (case_page := client.get("/cases/tx-42")).text.count("<rect ") < 2:
                assert time.monotonic() < deadline, case_page.text
                time.sleep(0.05)
            assert 'id="customer-chart"' in case_page.text
            client.post("/cases/tx-42/claim", data={"csrf": token})
            decided = time.monotonic()
            response = client.post(
                "/cases/tx-42/verdict", data={"csrf": token, "outcome": "fraud", "note": "ok"}
            )
            assert response.status_code == 303
            deadline = time.monotonic() + 30
            while store.pending_labels():
                assert time.monotonic() < deadline, "the label was not published"
                time.sleep(0.05)
            figures["verdict_to_label_ack_s"] = time.monotonic() - decided
        assert not app.state.failed

    # the test client runs the app (and its consumer) on a loop of its own, in a thread
    await asyncio.to_thread(scenario)
    labels = await read_topic(settings, settings.topic_labels, until=1)
    assert len(labels) == 1 and labels[0].key == b"c-1"
    label = parse_label(labels[0].value)  # the worker's own parser
    assert (label.transaction_id, label.customer_id, label.terminal_id, label.is_fraud) == (
        "tx-42",
        "c-1",
        "t-1",
        True,
    )
    assert label.event_time.timestamp() == pytest.approx(
        store.labelled_verdicts()[0].event_time.timestamp()
    )
    store.close()
    return figures


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_an_alert_reaches_the_queue_and_its_verdict_the_labels_topic(
    bundled_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str], database: str
) -> None:
    settings = new_settings(bundled_broker)
    await kafka_config.ensure_topics(settings)
    if database == "sqlite":
        figures = await _serve_one_case(settings, f"sqlite:///{tmp_path / 'console.db'}")
    else:
        from training.ops.services.postgres import PostgresServer

        server = PostgresServer()
        await asyncio.to_thread(server.start)
        try:
            figures = await _serve_one_case(settings, server.url)
        finally:
            await asyncio.to_thread(server.stop)
    with capsys.disabled():
        print(f"\nconsole figures ({bundled_broker.kind} broker, {database}): {figures}")
    assert figures["alert_to_queue_s"] < 30


def test_fraudstream_console_serves_pages_and_metrics_and_stops_on_sigterm(
    bundled_broker: Broker, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from stream_app.config import settings_environment
    from training.ops.services.net import LOOPBACK, free_port, wait_for_port

    settings = new_settings(bundled_broker)
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **settings_environment(settings),
        "FRAUDSTREAM_CONSOLE_DATABASE_URL": f"sqlite:///{tmp_path / 'console.db'}",
        "FRAUDSTREAM_CONSOLE_PORT": str(port),
        "FRAUDSTREAM_CONSOLE_METRICS_PORT": str(metrics_port),
    }
    bad = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "console"],
        env={**env, "FRAUDSTREAM_CONSOLE_SLA_S": "soon"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "FRAUDSTREAM_CONSOLE_SLA_S" in bad.stderr
    log_path = tmp_path / "console.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "console"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_for_port(LOOPBACK, port, 60), log_path.read_text()
        base = f"http://{LOOPBACK}:{port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            assert response.read() == b"ok"
        with urllib.request.urlopen(f"{base}/login", timeout=10) as response:
            assert 'name="csrf"' in response.read().decode()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: object, **kwargs: object) -> None:
                return None

        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.build_opener(NoRedirect).open(f"{base}/queue", timeout=10)
        assert raised.value.code == 303
        assert wait_for_port(LOOPBACK, metrics_port, 30)
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/", timeout=10) as response:
            exposition = response.read().decode()
        assert "fraudstream_console_verdicts_total" in exposition
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert "random key signs the sessions" in log_path.read_text()


async def test_the_workers_label_counters_take_a_console_verdict(
    bundled_broker: Broker, served_model: Path, tmp_path: Path
) -> None:
    """The real worker scores a transaction; the console's verdict on it comes back as a
    label the worker counts as a fraud on that transaction (not a mismatch, not a dead
    letter): the label's keys and event time are those the worker scored."""
    import orjson

    from training.ops.services.worker_process import WorkerProcess

    settings = new_settings(bundled_broker, model_dir=served_model)
    with WorkerProcess(settings, tmp_path / "worker.log") as worker:
        worker.start()
        event_ms = int((time.time() - 120) * 1000)
        producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
        await producer.start()
        try:
            transaction = {
                "transaction_id": "console-tx-1",
                "customer_id": "cust-77",
                "terminal_id": "term-5",
                "amount": 180.5,
                "timestamp": event_ms,
            }
            await producer.send_and_wait(
                settings.topic_transactions, orjson.dumps(transaction), key=b"cust-77"
            )
        finally:
            await producer.stop()
        (scored,) = await read_topic(settings, settings.topic_scores, until=1)
        score = ScoreRecord.from_json(scored.value)
        store = CaseStore(f"sqlite:///{tmp_path / 'cases.db'}")
        store.create_schema()
        metrics = ConsoleMetrics(CollectorRegistry())
        store.add_alerts([score])  # as if it had been an alert
        assert store.claim("console-tx-1", "ann", escalated_too=False)
        store.record_verdict("console-tx-1", Outcome.FRAUD, "confirmed", "ann")
        publisher = label_publisher(settings, store, metrics)
        task = asyncio.create_task(publisher.run())
        try:
            await wait_until(lambda: not store.pending_labels())
            await asyncio.to_thread(
                worker.wait_for, 'fraudstream_labels_total{outcome="fraud"}', 1, 60
            )
        finally:
            publisher.stop()
            await asyncio.wait_for(task, 30)
            store.close()
        assert worker.metric('fraudstream_labels_total{outcome="dead_letter"}') in (None, 0.0)
