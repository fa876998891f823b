"""Alert reasons read as a fraud analyst writes them, over a week of real alerts.

The shipped model (``onnx_models/default``) scores two weeks of simulated transactions
through the real pipeline and the real Redis, labels arriving as the replay publishes
them; every reason of the second week's alerts is then read as an analyst would.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from stream_app.records import Decision, ScoreRecord
from stream_app.scoring.pipeline import ScoringPipeline
from stream_app.scoring.reasons import fallback_reason, money, plural, times
from stream_app.state.redis import RedisStateStore
from tests.kafka_fixtures import REDIS_URL
from tests.stream_app.scoring.test_pipeline import _events_in_replay_order, _registry, _replay
from training.simulator import SimulatorConfig, simulate

DEFAULT_MODEL = Path(__file__).resolve().parents[3] / "onnx_models" / "default"
DAY_MS = 86_400_000

# "1 known frauds", "1 transactions", "1 days": a plural after exactly one.
_BAD_PLURAL = re.compile(r"(?<![\d.,])1 (known frauds|transactions|days)\b")
# A number with more than two decimals, or a ratio written "3.0x".
_OVERPRECISE = re.compile(r"\d\.\d{3,}|\d\.0x")


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[RedisStateStore]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False)
    yield RedisStateStore(client, prefix=redis_prefix, sequence_length=5)
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start : start + 1000])
    await client.aclose()


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d[\d,]*(?:\.\d+)?", text)


@pytest.mark.integration
async def test_a_week_of_alerts_reads_as_an_analyst_writes(store: RedisStateStore) -> None:
    frame = simulate(SimulatorConfig(n_customers=400, n_terminals=800, n_days=14, seed=3))
    registry = _registry(DEFAULT_MODEL)
    pipeline = ScoringPipeline(store, registry, registry.metrics, max_reasons=3)
    events, labels = _events_in_replay_order(frame)
    records: dict[str, ScoreRecord] = await _replay(pipeline, store, events, labels, batch=256)

    week_start_ms = int(events[0].event_time_s * 1000) + 7 * DAY_MS
    by_id = {e.transaction_id: e for e in events}
    alerts = [
        r
        for r in records.values()
        if r.decision is not Decision.APPROVE
        and by_id[r.transaction_id].event_time_s * 1000 >= week_start_ms
    ]
    assert len(alerts) >= 20, f"a week should give alerts to read, got {len(alerts)}"
    texts = [text for record in alerts for text in record.reasons]
    problems: list[str] = []
    for record in alerts:
        reasons = record.reasons
        amount = f"{record.amount:,.2f}"
        if sum(text.count(amount) for text in reasons) > 1:
            problems.append(f"amount said twice: {reasons}")
        if len(set(reasons)) != len(reasons):
            problems.append(f"a reason repeated: {reasons}")
        for text in reasons:
            if _BAD_PLURAL.search(text):
                problems.append(f"plural after one: {text!r}")
            if re.search(r"\b0 known frauds?\b|no transactions", text):
                problems.append(f"a fact that lowers the risk: {text!r}")
            if _OVERPRECISE.search(text):
                problems.append(f"not rounded: {text!r}")
            if text == fallback_reason(record.score):
                continue
            # Every stated average or ratio is rounded: ratios "5.1x"/"18x", averages in
            # whole units from 100 up.
            for ratio in re.findall(r"(\d+(?:\.\d+)?)x", text):
                if float(ratio) >= 10 and "." in ratio:
                    problems.append(f"ratio not rounded: {text!r}")
            for average in re.findall(r"average \((\d[\d,]*(?:\.\d+)?)\)", text):
                if float(average.replace(",", "")) >= 100 and "." in average:
                    problems.append(f"average not rounded: {text!r}")
    assert not problems, "\n".join(problems[:20])
    # The model's strongest signals show up, phrased with singulars where one is meant.
    assert any(text.startswith("amount ") for text in texts), texts[:20]
    assert any("terminal had" in text for text in texts) or any(
        "customer" in text for text in texts
    ), texts[:20]
    assert all(_numbers(text) for text in texts if text.startswith("amount "))


def test_phrases_use_singulars_and_rounding_as_people_write() -> None:
    assert plural(1, "known fraud") == "1 known fraud"
    assert plural(1, "day") == "1 day" and plural(7, "day") == "7 days"
    assert plural(0, "transaction") == "0 transactions"
    assert money(100.45) == "100" and money(42.5) == "42.50"
    assert times(18.04) == "18x" and times(3.0) == "3x" and times(5.14) == "5.1x"
    assert np.isfinite(float(times(2.25)[:-1]))
