"""Session services and per-test names for the integration tests.

* ``kafka_broker``: the bundled Kafka-protocol broker (Tansu), started once per session
  (or ``FRAUDSTREAM_TEST_KAFKA_BOOTSTRAP`` to use a running one);
* ``make_settings``: worker :class:`Settings` on that broker and the real Redis, with topics,
  consumer group and Redis key prefix no other test uses (keys deleted afterwards);
* ``small_transactions`` / ``served_model`` / ``second_model``: a small simulated dataset
  and real exported ONNX models, built once per session.

``tests/conftest.py`` re-exports the fixtures, so any test module can ask for them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from stream_app.broker import BundledBroker
from stream_app.config import Settings, load_settings
from stream_app.model_card import Thresholds

REDIS_URL = os.environ.get("FRAUDSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_SEQUENCE_LENGTH = 5


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a Kafka-protocol broker, started once for the session."""
    external = os.environ.get("FRAUDSTREAM_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = BundledBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log")
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_settings(kafka_broker: str) -> Iterator[Callable[..., Settings]]:
    """Factory of worker settings isolated from every other test.

    Each call gets fresh topic names, consumer group and Redis key prefix; keyword
    arguments override any setting. The Redis keys of every prefix handed out are deleted
    when the test ends.
    """
    prefixes: list[str] = []

    def factory(**overrides: Any) -> Settings:
        tag = uuid.uuid4().hex[:10]
        prefix = f"test-{tag}"
        prefixes.append(overrides.get("state_key_prefix", prefix))
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": kafka_broker,
            "redis_url": REDIS_URL,
            "group_id": f"g-{tag}",
            "instance_id": "test",
            "idempotent_producer": False,
            "topic_transactions": f"tx-{tag}",
            "topic_labels": f"labels-{tag}",
            "topic_scores": f"scores-{tag}",
            "topic_alerts": f"alerts-{tag}",
            "topic_shadow_scores": f"shadow-{tag}",
            "topic_dead_letters": f"dlq-{tag}",
            "topic_label_dead_letters": f"labels-dlq-{tag}",
            "topic_partitions": 2,
            "state_key_prefix": prefix,
            "metrics_port": 0,
            "model_poll_interval_s": 0.5,
        }
        values.update(overrides)
        return load_settings(**values)

    yield factory
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
    finally:
        client.close()


@dataclass(frozen=True)
class Dataset:
    """A simulated transactions table, and the file it was written to."""

    frame: pd.DataFrame
    path: Path


def simulate_small(seed: int = 7, n_days: int = 40) -> pd.DataFrame:
    """A small labelled dataset: 60 customers over ``n_days`` days, a few percent fraud."""
    from training.simulator import SimulatorConfig, simulate

    return simulate(
        SimulatorConfig(
            n_customers=60,
            n_terminals=200,
            n_days=n_days,
            radius=10.0,
            seed=seed,
            compromised_terminals_per_day=1,
            terminal_compromise_days=7,
            compromised_customers_per_day=1,
            customer_compromise_days=7,
        )
    )


@pytest.fixture(scope="session")
def small_transactions(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """About 4,000 simulated transactions over 40 days, written as Parquet."""
    from training.transactions import write_transactions

    frame = simulate_small()
    path = tmp_path_factory.mktemp("data") / "transactions.parquet"
    write_transactions(frame, path)
    return Dataset(frame, path)


def build_model(
    directory: Path,
    frame: pd.DataFrame,
    *,
    version: str,
    seed: int,
    epochs: int = 25,
    sequence_length: int = TEST_SEQUENCE_LENGTH,
) -> Path:
    """Train a tiny LSTM for a few seconds and export it with a card; returns ``directory``.

    The thresholds put about 7% of the rows up for review and 2% declined, so every test
    replay has alerts of both kinds.
    """
    import torch

    from stream_app import features
    from training.export import export_model
    from training.sequence_model import LstmScorer, ModelConfig, feature_statistics, predict
    from training.transactions import to_arrays

    torch.manual_seed(seed)
    arrays = to_arrays(frame)
    offline = features.offline_features(
        arrays.customer_ids,
        arrays.terminal_ids,
        arrays.times_ms,
        arrays.amounts,
        arrays.is_fraud,
    )
    sequences = offline.sequences(sequence_length)
    mean, std = feature_statistics(sequences)
    model = LstmScorer(mean, std, ModelConfig(hidden_size=16, head_size=16, dropout=0.0))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
    # A subsample trains well enough to make scores respond to the features, in seconds.
    rows = np.random.default_rng(seed).choice(len(sequences), min(1500, len(sequences)), False)
    x = torch.from_numpy(sequences[rows])
    labels = torch.as_tensor(arrays.is_fraud[offline.order][rows], dtype=torch.float32)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        optimiser.zero_grad()
        loss = loss_fn(model.logits(x), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    model.eval()
    scores = predict(model, sequences)
    review, decline = np.quantile(scores, [0.93, 0.98])
    export_model(
        model,
        directory,
        version=version,
        parity_sequences=sequences,
        thresholds=Thresholds(review=float(review), decline=float(decline)),
        reference_scores=scores,
        reference_source="tests: simulated training rows",
        training={"epochs": epochs, "seed": seed},
        metrics={},
        overwrite=True,
    )
    return directory


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory, small_transactions: Dataset) -> Path:
    """A real exported model (version ``test-a``) for the worker tests."""
    directory = tmp_path_factory.mktemp("models") / "test-a"
    return build_model(directory, small_transactions.frame, version="test-a", seed=1)


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory, small_transactions: Dataset) -> Path:
    """Another real model (version ``test-b``, other weights): swaps and shadow scoring."""
    directory = tmp_path_factory.mktemp("models") / "test-b"
    return build_model(directory, small_transactions.frame, version="test-b", seed=2, epochs=30)
