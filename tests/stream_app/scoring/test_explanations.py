"""Explanations that point at the transactions behind a score, checked for faithfulness.

The shipped model scores two weeks of simulated transactions through the real pipeline and
the real Redis (labels as the replay publishes them). For every alert of the second week
whose customer had at least two earlier transactions in the sequence, the earlier
transaction its attributions name first is taken out of the customer's sequence, computed
independently offline (``features.offline_features``), and the sequence is scored by the
served ONNX graph: it must lower the score more than taking out another earlier
transaction picked at random, on at least 90 % of those alerts. The named transaction's
amount and time are checked against the data too.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from stream_app import features
from stream_app.models.scorer import OnnxScorer
from stream_app.records import Decision
from stream_app.scoring.pipeline import ScoringPipeline
from stream_app.state.redis import RedisStateStore
from tests.kafka_fixtures import REDIS_URL
from tests.stream_app.scoring.test_pipeline import _events_in_replay_order, _registry, _replay
from training.simulator import SimulatorConfig, simulate
from training.transactions import to_arrays

DEFAULT_MODEL = Path(__file__).resolve().parents[3] / "onnx_models" / "default"
DAY_MS = 86_400_000


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[RedisStateStore]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False)
    yield RedisStateStore(client, prefix=redis_prefix, sequence_length=5)
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start : start + 1000])
    await client.aclose()


def _without(sequence: np.ndarray, row: int) -> np.ndarray:
    """``sequence`` with ``row`` taken out: the older rows move up, padding in front."""
    return np.concatenate([np.zeros_like(sequence[:1]), sequence[:row], sequence[row + 1 :]])


@pytest.mark.integration
async def test_the_transaction_named_first_drives_the_score_more_than_a_random_one(
    store: RedisStateStore,
) -> None:
    frame = simulate(SimulatorConfig(n_customers=400, n_terminals=800, n_days=14, seed=3))
    registry = _registry(DEFAULT_MODEL)
    pipeline = ScoringPipeline(store, registry, registry.metrics, max_reasons=3)
    events, labels = _events_in_replay_order(frame)
    records = await _replay(pipeline, store, events, labels, batch=256)

    scorer = OnnxScorer(DEFAULT_MODEL)
    length = scorer.card.sequence_length
    arrays = to_arrays(frame)
    offline = features.offline_features(
        arrays.customer_ids, arrays.terminal_ids, arrays.times_ms, arrays.amounts, arrays.is_fraud
    )
    row_of = {str(arrays.transaction_ids[i]): k for k, i in enumerate(offline.order.tolist())}
    index = features.sequence_index(offline.group, length)
    week_start_ms = int(events[0].event_time_s * 1000) + 7 * DAY_MS
    by_id = {e.transaction_id: e for e in events}
    rng = random.Random(0)

    checked = faithful = 0
    for record in records.values():
        event = by_id[record.transaction_id]
        if record.decision is Decision.APPROVE or event.event_time_s * 1000 < week_start_ms:
            continue
        named = [a for a in record.attributions if a.kind == "transaction"]
        if len(named) < 2:
            continue
        row = row_of[record.transaction_id]
        sequence = offline.sequences(length, np.array([row]))[0]
        first = named[0]
        assert first.transactions_before is not None
        position = length - 1 - first.transactions_before
        earlier_row = index[row, position]
        assert earlier_row >= 0, record
        # The named transaction's own facts are the customer's real earlier transaction's.
        source = offline.order[earlier_row]
        assert first.amount == pytest.approx(float(arrays.amounts[source]))
        assert first.seconds_before == pytest.approx(
            (event.event_time_s * 1000 - arrays.times_ms[source]) / 1000, abs=0.002
        )
        others = [
            length - 1 - a.transactions_before
            for a in named[1:]
            if a.transactions_before is not None
        ]
        other = rng.choice(others)
        base, drop_named, drop_other = scorer.score(
            np.stack([sequence, _without(sequence, position), _without(sequence, other)])
        ).tolist()
        checked += 1
        faithful += (base - drop_named) > (base - drop_other)
    assert checked >= 20, f"a week should give alerts with a history, got {checked}"
    assert faithful / checked >= 0.9, f"{faithful} of {checked}"
