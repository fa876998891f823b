"""One card's burst through the real worker: its Redis key stays bounded, scores stay exact.

Card testing sends thousands of transactions of one card in minutes. Every one of them is
within the 30-day customer window, so before customer windows counted at most
``features.MAX_CUSTOMER_WINDOW_TX`` transactions the card's history (and the work per
event) grew without bound. Here a burst of a few thousand rides in the small simulated
dataset: the card's key never exceeds ``(T - 1 + K + TRIM_SLACK)`` records, and every
event's score equals ``score-file``'s on the same data (the offline path applies the same
bound). Speed is measured by ``python -m training.ops.bench_burst``, not here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from stream_app import features
from stream_app.config import Settings
from stream_app.models.scorer import OnnxScorer
from stream_app.state.store import ENTRY_SIZE, TRIM_SLACK, max_history
from tests.kafka_fixtures import REDIS_URL, Dataset, read_topic
from tests.model_fixtures import TEST_SEQUENCE_LENGTH
from tests.resilience_helpers import publish, score_records, transaction_messages
from training.ops.replay import ensure_input_topics
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BURST = 3_000
CARD = 10_000  # above every customer id of the small dataset
RATE = 400.0  # events/s published (see below)


def with_burst(frame: pd.DataFrame) -> pd.DataFrame:
    """The dataset plus ``BURST`` transactions of one card ~1 s apart, from day 20 on.

    Labels are left out (every ``TX_FRAUD`` 0, none published): terminal risk is not what
    this test is about, and offline and online then both see none.
    """
    rng = np.random.default_rng(5)
    start = frame["TX_DATETIME"].min().normalize() + pd.Timedelta(days=20, hours=9)
    gaps_ms = rng.integers(0, 2_000, BURST)
    burst = pd.DataFrame(
        {
            "TRANSACTION_ID": np.arange(BURST) + int(frame["TRANSACTION_ID"].max()) + 1,
            "TX_DATETIME": start + pd.to_timedelta(np.cumsum(gaps_ms), unit="ms"),
            "CUSTOMER_ID": CARD,
            "TERMINAL_ID": rng.choice(frame["TERMINAL_ID"].unique(), BURST),
            "TX_AMOUNT": np.round(rng.uniform(0.5, 5.0, BURST), 2),
            "TX_TIME_SECONDS": 0,
            "TX_TIME_DAYS": 0,
            "TX_FRAUD": 0,
            "TX_FRAUD_SCENARIO": 0,
        }
    ).astype(frame.dtypes.to_dict())
    out = pd.concat([frame, burst], ignore_index=True)
    out["TX_FRAUD"] = out["TX_FRAUD"] * 0
    return out


class KeyWatch:
    """Samples a Redis string key's length every few milliseconds; keeps the largest."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.largest = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            while not self._stop.wait(0.005):
                self.largest = max(self.largest, int(client.strlen(self.key)))
                self.samples += 1
        finally:
            client.close()

    def __enter__(self) -> KeyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_a_burst_keeps_its_key_bounded_and_scores_as_score_file(
    make_settings: Callable[..., Settings],
    served_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    frame = with_burst(small_transactions.frame)
    offline = features.offline_features(
        frame["CUSTOMER_ID"].to_numpy(),
        frame["TERMINAL_ID"].to_numpy(),
        np.asarray(frame["TX_DATETIME"].astype("int64") // 1_000_000, dtype=np.int64),
        frame["TX_AMOUNT"].to_numpy(),
        frame["TX_FRAUD"].to_numpy(),
    )
    count_30 = offline.features[:, features.FEATURE_INDEX["CUSTOMER_ID_NB_TX_30DAY_WINDOW"]]
    assert count_30.max() == features.MAX_CUSTOMER_WINDOW_TX  # the burst reaches the bound
    reference = score_table(frame, OnnxScorer(served_model)).table

    settings = make_settings(model_dir=served_model)
    bound = (max_history(TEST_SEQUENCE_LENGTH) + TRIM_SLACK) * ENTRY_SIZE
    key = f"{settings.state_key_prefix}:c:{CARD}"
    n = len(frame)
    asyncio.run(ensure_input_topics(settings))
    with WorkerProcess(settings, tmp_path / "worker.log") as worker, KeyWatch(key) as watch:
        worker.start()
        # Live, the worker takes events in arrival order: published in event-time order at
        # a rate the worker keeps up with, that is event-time order across partitions too,
        # as score-file assumes. (Published much faster, e.g. 1,500/s, to a running worker,
        # some of the other customers' terminal windows differ from score-file's, on
        # Apache Kafka even without the burst: an ordering matter, not this test's.)
        publish(settings, transaction_messages(frame, settings), rate=RATE)
        raw = asyncio.run(read_topic(settings, settings.topic_scores, until=n, timeout_s=150))
        records = score_records(raw)
        worker.wait_for('fraudstream_events_total{outcome="scored"}', n, timeout_s=120)
        assert worker.terminate() == 0, worker.log()
    assert watch.samples > 100
    # Bounded, and by the count: a burst within 30 days is never trimmed by time.
    assert max_history(TEST_SEQUENCE_LENGTH) * ENTRY_SIZE <= watch.largest <= bound
    assert watch.largest < BURST * ENTRY_SIZE

    scores = {r.transaction_id: r for r in records}
    ids = [str(t) for t in reference["TRANSACTION_ID"]]
    assert len(records) == n and sorted(scores) == sorted(ids)
    ours = np.array([scores[t].score for t in ids])
    np.testing.assert_allclose(ours, reference["score"].to_numpy(), rtol=0, atol=1e-5)
    assert [scores[t].decision.value for t in ids] == list(reference["decision"])
