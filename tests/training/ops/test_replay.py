"""``fraudstream replay``: event-time order, labels when known, real publishing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pandas as pd
import pytest
from typer.testing import CliRunner

from stream_app.cli import app, register_commands
from stream_app.config import Settings
from stream_app.errors import ConfigError
from stream_app.records import parse_label, parse_transaction, transaction_json
from tests.kafka_fixtures import Dataset, read_topic
from training.ops.replay import parse_duration, replay, replay_messages


def _frame() -> pd.DataFrame:
    """Four rows out of order, two at the same instant, one fraud."""
    return pd.DataFrame(
        {
            "TRANSACTION_ID": [3, 1, 2, 0],
            "TX_DATETIME": pd.to_datetime(
                ["2018-04-02 10:00", "2018-04-01 09:00", "2018-04-01 09:00", "2018-04-03 08:00"]
            ),
            "CUSTOMER_ID": [7, 7, 8, 9],
            "TERMINAL_ID": [1, 2, 3, 4],
            "TX_AMOUNT": [10.0, 20.5, 30.25, 40.0],
            "TX_TIME_SECONDS": [0, 0, 0, 0],
            "TX_TIME_DAYS": [0, 0, 0, 0],
            "TX_FRAUD": [0, 1, 0, 0],
            "TX_FRAUD_SCENARIO": [0, 1, 0, 0],
        }
    )


def _ids(frame: pd.DataFrame, **options: object) -> list[str]:
    messages = replay_messages(frame, transactions_topic="tx", labels_topic="labels", **options)  # type: ignore[arg-type]
    out = []
    for m in messages:
        doc = orjson.loads(m.value)
        out.append(("L" if m.is_label else "T") + doc["transaction_id"])
    return out


def test_transactions_go_in_event_time_then_id_order() -> None:
    assert _ids(_frame()) == ["T1", "T2", "T3", "T0"]


def test_fraud_labels_are_interleaved_when_they_become_known() -> None:
    assert _ids(_frame(), labels_delay=timedelta(hours=12)) == ["T1", "T2", "L1", "T3", "T0"]
    assert _ids(_frame(), labels_delay=timedelta(days=3)) == ["T1", "T2", "T3", "T0", "L1"]
    # At the same instant a label goes first: it is known by then.
    assert _ids(_frame(), labels_delay=timedelta(hours=25)) == ["T1", "T2", "L1", "T3", "T0"]


def test_genuine_labels_only_on_request() -> None:
    ids = _ids(_frame(), labels_delay=timedelta(0), all_labels=True)
    assert ids == ["T1", "L1", "T2", "L2", "T3", "L3", "T0", "L0"]


def test_limit_keeps_the_first_transactions_in_event_time() -> None:
    assert _ids(_frame(), limit=2, labels_delay=timedelta(days=30)) == ["T1", "T2", "L1"]


def test_payloads_are_the_event_contract_keyed_by_customer() -> None:
    messages = list(
        replay_messages(
            _frame(),
            transactions_topic="tx",
            labels_topic="labels",
            labels_delay=timedelta(hours=1),
        )
    )
    first = messages[0]
    assert first.topic == "tx" and first.key == b"7"
    assert first.value == transaction_json(1, 7, 2, 1_522_573_200_000, 20.5)
    event = parse_transaction(first.value)
    assert (event.transaction_id, event.amount) == ("1", 20.5)
    label = parse_label(next(m for m in messages if m.is_label).value)
    assert label.is_fraud and label.reported_at_s - label.event_time_s == 3600


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604_800), ("12h", 43_200), ("30m", 1800), ("45s", 45), ("90", 90)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_a_bad_duration_says_what_is_expected() -> None:
    with pytest.raises(ConfigError, match=r"use e\.g\. 7d"):
        parse_duration("a week")


@pytest.mark.integration
def test_replay_publishes_keyed_in_order_at_the_rate(
    make_settings: Callable[..., Settings], small_transactions: Dataset
) -> None:
    settings = make_settings()
    frame = small_transactions.frame
    limit = 600
    messages = replay_messages(
        frame,
        transactions_topic=settings.topic_transactions,
        labels_topic=settings.topic_labels,
        labels_delay=timedelta(days=1),
        limit=limit,
    )
    started = time.monotonic()
    stats = asyncio.run(replay(messages, settings, rate=1000))
    elapsed = time.monotonic() - started
    assert stats.transactions == limit and stats.labels > 0
    assert elapsed >= 0.5  # paced: 600 at 1,000/s
    records = asyncio.run(read_topic(settings, settings.topic_transactions, until=limit))
    assert len(records) == limit
    for partition in {r.partition for r in records}:
        times = [orjson.loads(r.value)["timestamp"] for r in records if r.partition == partition]
        assert times == sorted(times)
    assert all(r.key == orjson.loads(r.value)["customer_id"].encode() for r in records)
    labels = asyncio.run(read_topic(settings, settings.topic_labels, until=stats.labels))
    assert len(labels) == stats.labels
    assert all(orjson.loads(r.value)["is_fraud"] for r in labels)


@pytest.mark.integration
def test_the_replay_command(
    make_settings: Callable[..., Settings], small_transactions: Dataset
) -> None:
    settings = make_settings()
    register_commands()
    result = CliRunner().invoke(
        app,
        [
            "replay",
            "--data",
            str(small_transactions.path),
            "--rate",
            "0",
            "--limit",
            "300",
            "--labels-delay",
            "7d",
            "--bootstrap",
            settings.kafka_bootstrap_servers,
            "--transactions-topic",
            settings.topic_transactions,
            "--labels-topic",
            settings.topic_labels,
        ],
        env={"FRAUDSTREAM_IDEMPOTENT_PRODUCER": "false"},
    )
    assert result.exit_code == 0, result.output
    assert "published 300 transactions" in result.output
    records = asyncio.run(read_topic(settings, settings.topic_transactions, until=300))
    assert len(records) == 300


def test_the_replay_command_refuses_a_missing_file(tmp_path: object) -> None:
    register_commands()
    result = CliRunner().invoke(app, ["replay", "--data", "/nonexistent/tx.parquet"])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_the_replay_command_names_a_broker_it_cannot_reach(tmp_path: Path) -> None:
    # A one-shot tool does not wait for a broker: it says where it looked and what to set.
    from training.ops.services.net import LOOPBACK, free_port
    from training.transactions import write_transactions

    data = tmp_path / "tx.parquet"
    write_transactions(_frame(), data)
    address = f"{LOOPBACK}:{free_port()}"
    register_commands()
    result = CliRunner().invoke(
        app, ["replay", "--data", str(data), "--bootstrap", address], terminal_width=400
    )
    assert result.exit_code == 2, result.output
    assert f"cannot reach Kafka at {address}" in result.output
    assert "--bootstrap" in result.output and "FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS" in result.output
