"""``fraudstream demo`` end to end, as on a fresh machine: its own broker and Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.demo import DemoSummary, histogram_quantile, summarise
from training.services.brokers import BROKER_KINDS, BrokerKind, describe

# The demo command through a fresh Typer app: training.commands wires it into the
# `fraudstream` CLI; this test does not depend on that wiring.
RUN_DEMO = (
    "import typer; from training.stream_commands import register_stream_commands; "
    "app = typer.Typer(); register_stream_commands(app); app()"
)


def _fresh_environment() -> dict[str, str]:
    """No Kafka, no Redis, no FRAUDSTREAM_* configuration."""
    drop = ("FRAUDSTREAM_", "KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKER_KINDS)
def test_the_demo_runs_end_to_end_and_summarises_precision_and_recall(
    served_model: Path, broker: BrokerKind
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_DEMO,
            "demo",
            "--broker",
            broker,
            "--events",
            "800",
            "--rate",
            "400",
            "--model-dir",
            str(served_model),
            "--customers",
            "60",
            "--days",
            "20",
        ],
        env=_fresh_environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"started {describe(broker)}" in output
    assert "using a local redis-server" in output
    assert re.search(r"transactions scored\s+│\s+800", output), output
    assert re.search(r"precision of alerts\s+│\s+\d+\.\d%", output)
    assert re.search(r"recall of alerts\s+│\s+\d+\.\d%", output)
    assert re.search(r"http://127\.0\.0\.1:\d+/metrics", output)
    if broker == "kafka":  # the worker ran what docker-compose.yml deploys
        assert "exactly_once" in output, output


def test_the_demo_without_a_model_says_to_train_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_DEMO, "demo", "--model-dir", str(tmp_path / "none")],
        env=_fresh_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "fraudstream train" in done.stderr
    assert "Traceback" not in done.stderr


def test_summary_counts_alerts_against_labels() -> None:
    import pandas as pd

    from stream_app.records import Decision, ScoreRecord

    frame = pd.DataFrame({"TRANSACTION_ID": [1, 2, 3, 4], "TX_FRAUD": [1, 1, 0, 0]})

    def record(tx: int, decision: Decision) -> ScoreRecord:
        return ScoreRecord(
            transaction_id=str(tx),
            customer_id="c",
            terminal_id="t",
            amount=1.0,
            event_time="2018-04-01T00:00:00.000Z",
            score=0.5,
            decision=decision,
            model_version="v",
            scored_at="2018-04-01T00:00:00.000Z",
        )

    scores = {
        "1": record(1, Decision.DECLINE),
        "2": record(2, Decision.APPROVE),
        "3": record(3, Decision.REVIEW),
        "4": record(4, Decision.APPROVE),
    }
    summary = summarise(frame, scores)
    assert summary == DemoSummary(
        scored=4, frauds=2, alerts=2, true_alerts=1, declines=1, true_declines=1
    )
    assert summary.precision == 0.5 and summary.recall == 0.5


def test_latency_quantiles_interpolate_like_prometheus() -> None:
    buckets = {0.005: 10.0, 0.01: 60.0, 0.02: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.005 + 0.005 * 40 / 50)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.01 * 39 / 40)
