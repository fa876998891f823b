"""Every dashboard query returns data from a real Prometheus scraping a real worker.

A worker (subprocess, bundled broker, real Redis, real ONNX model) scores a paced replay
with labels and some malformed messages, and a review console (subprocess, SQLite) turns
its alerts into cases, while Debian's ``prometheus`` server scrapes both every second.
Then each panel's PromQL goes through Prometheus's HTTP API, and so do the alert rules'
expressions (they must at least evaluate).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaProducer

from stream_app.config import Settings
from stream_app.kafka import config as kafka_config
from tests.cleanup import keep_for_fixture
from tests.kafka_fixtures import Dataset, delete_state, new_settings
from tests.monitoring.test_monitoring import MONITORING, dashboard_queries
from training.ops.replay import replay, replay_messages
from training.ops.services.console import LocalConsole
from training.ops.services.net import free_port, wait_for_port
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRAPE_INTERVAL_S = 1
MALFORMED = [b"not json", b"[1, 2]", b'{"transaction_id": "x"}'] * 5


class PrometheusServer:
    """Debian's prometheus binary scraping one target per job, with our alert rules loaded."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: run `bash tests/setup.sh`")
        self.port = free_port()
        shutil.copy(MONITORING / "alerts.yml", workdir / "alerts.yml")
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not wait_for_port("127.0.0.1", self.port, 30):
            self.stop()
            pytest.fail("prometheus did not start")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; the result vector."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


async def _feed(settings: Settings, data: Dataset) -> None:
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    try:
        for value in MALFORMED:
            await producer.send_and_wait(settings.topic_transactions, value, key=b"1")
    finally:
        await producer.stop()
    messages = replay_messages(
        data.frame,
        transactions_topic=settings.topic_transactions,
        labels_topic=settings.topic_labels,
        labels_delay=timedelta(hours=1),
        limit=6000,
    )
    await replay(messages, settings, rate=400)


@pytest.fixture(scope="module")
def scraped_worker(
    kafka_broker: str,
    small_transactions: Dataset,
    served_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    workdir = tmp_path_factory.mktemp("prometheus")
    settings = new_settings(kafka_broker, model_dir=served_model)
    keep_for_fixture(settings.state_key_prefix)  # the worker runs through the module
    console = LocalConsole(settings, workdir)
    with WorkerProcess(settings, workdir / "worker.log") as worker:
        worker.start()
        console.start()
        prometheus = PrometheusServer(
            workdir,
            {
                "fraudstream-worker": f"127.0.0.1:{worker.metrics_port}",
                "fraudstream-console": f"127.0.0.1:{console.metrics_port}",
            },
        )
        try:
            asyncio.run(_feed(settings, small_transactions))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if prometheus.query("sum(fraudstream_events_total) >= 6000"):
                    break
                time.sleep(1)
            time.sleep(4 * SCRAPE_INTERVAL_S)  # a few scrapes after the last event
            yield prometheus
        finally:
            prometheus.stop()
            console.stop()
            worker.terminate()
            delete_state(settings.state_key_prefix)


@pytest.mark.parametrize(("title", "expr"), dashboard_queries(), ids=lambda v: str(v)[:40])
def test_every_dashboard_query_returns_data(
    scraped_worker: PrometheusServer, title: str, expr: str
) -> None:
    assert scraped_worker.query(expr), f"panel {title!r} shows nothing: {expr}"


def test_every_alert_expression_evaluates(scraped_worker: PrometheusServer) -> None:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        scraped_worker.query(rule["expr"])  # raises on a PromQL error


def test_the_metrics_the_rules_need_are_scraped(scraped_worker: PrometheusServer) -> None:
    for metric in (
        "fraudstream_score_psi",
        "fraudstream_last_commit_timestamp_seconds",
        "fraudstream_consumer_lag",
        "fraudstream_redis_errors_total",
        "fraudstream_model_reloads_total",
    ):
        assert scraped_worker.query(metric), metric


def test_the_console_turned_the_workers_alerts_into_cases(
    scraped_worker: PrometheusServer,
) -> None:
    opened = scraped_worker.query('sum(fraudstream_console_alerts_total{outcome="opened"})')
    alerts = scraped_worker.query("sum(fraudstream_alerts_total)")
    assert opened and alerts and float(alerts[0]["value"][1]) > 0
    # Every alert the worker raised became one case (the console may lag a scrape behind).
    assert float(opened[0]["value"][1]) == float(alerts[0]["value"][1])
    for metric in (
        "fraudstream_console_oldest_case_age_seconds",
        "fraudstream_console_sla_seconds",
    ):
        assert scraped_worker.query(f"{metric} > 0"), metric
