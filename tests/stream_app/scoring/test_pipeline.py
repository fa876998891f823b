"""The micro-batch pipeline against the real Redis and real exported models (no broker).

Also the pieces it is made of: reasons, the drift gauge, the metrics, the model registry.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from stream_app import features as F
from stream_app.errors import ModelError, RejectReason
from stream_app.metrics import ScoreDrift, WorkerMetrics, population_stability_index
from stream_app.models.card import CARD_FILE, SCORE_BUCKET_EDGES
from stream_app.models.registry import ModelOptions, ModelRegistry, load_model, resolve_model_dir
from stream_app.records import (
    DEFAULT_LIMITS,
    Decision,
    ScoreRecord,
    TransactionEvent,
    iso_utc_millis,
    label_json,
    transaction_json,
)
from stream_app.scoring.pipeline import (
    Inbound,
    ScoringPipeline,
    apply_labels,
    checked_scores,
    epoch_ms,
    expired_labels,
    utc_millis,
    validate_transactions,
)
from stream_app.scoring.reasons import (
    FEATURE_GROUPS,
    MIN_CONTRIBUTION,
    AlertContext,
    explain,
    fallback_reason,
)
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import TransactionUpdate
from tests.kafka_fixtures import REDIS_URL, Dataset
from tests.model_fixtures import POISON_AMOUNT, TEST_SEQUENCE_LENGTH
from training.score_file import score_table
from training.transactions import to_arrays

LABEL_DELAY_MS = 86_400_000  # one day: well inside the features' seven


def _inbound(values: list[bytes], topic: str = "tx") -> list[Inbound]:
    return [Inbound(topic, 0, i, None, v, 0) for i, v in enumerate(values)]


def _events_in_replay_order(frame: pd.DataFrame) -> tuple[list[TransactionEvent], list[bytes]]:
    """The dataset's transactions and fraud labels as the replay would publish them."""
    a = to_arrays(frame)
    order = np.lexsort((a.transaction_ids, a.times_ms))
    payloads = [
        transaction_json(
            int(a.transaction_ids[i]),
            int(a.customer_ids[i]),
            int(a.terminal_ids[i]),
            int(a.times_ms[i]),
            float(a.amounts[i]),
        )
        for i in order
    ]
    accepted, rejected = validate_transactions(_inbound(payloads), DEFAULT_LIMITS)
    assert not rejected
    labels = [
        label_json(
            int(a.transaction_ids[i]),
            int(a.customer_ids[i]),
            int(a.terminal_ids[i]),
            int(a.times_ms[i]),
            True,
            int(a.times_ms[i]) + LABEL_DELAY_MS,
        )
        for i in order
        if a.is_fraud[i]
    ]
    return [x.event for x in accepted], labels


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[RedisStateStore]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False)
    yield RedisStateStore(client, prefix=redis_prefix, sequence_length=5)
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start : start + 1000])
    await client.aclose()


def _registry(champion: Path, challenger: Path | None = None, **options: object) -> ModelRegistry:
    metrics = WorkerMetrics(CollectorRegistry(), process_collectors=False)
    registry = ModelRegistry(champion, challenger, ModelOptions(**options), metrics)  # type: ignore[arg-type]
    registry.load_initial()
    return registry


async def _replay(
    pipeline: ScoringPipeline,
    store: RedisStateStore,
    events: list[TransactionEvent],
    labels: list[bytes],
    batch: int,
) -> dict[str, ScoreRecord]:
    """Labels first when known (their report time has come), then transactions by batch."""
    label_times = [orjson.loads(raw)["reported_at"] for raw in labels]
    next_label = 0
    records: dict[str, ScoreRecord] = {}
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        first_ms = int(chunk[0].event_time_s * 1000)
        due = next_label
        while due < len(labels) and label_times[due] <= first_ms:
            due += 1
        if due > next_label:
            await apply_labels(
                _inbound(labels[next_label:due], "labels"), store, DEFAULT_LIMITS, pipeline.metrics
            )
            next_label = due
        for record in (await pipeline.process(chunk)).records:
            records[record.transaction_id] = record
    return records


@pytest.mark.integration
async def test_pipeline_equals_the_offline_reference(
    store: RedisStateStore, served_model: Path, small_transactions: Dataset
) -> None:
    registry = _registry(served_model)
    pipeline = ScoringPipeline(store, registry, registry.metrics)
    events, labels = _events_in_replay_order(small_transactions.frame)
    records = await _replay(pipeline, store, events, labels, batch=64)

    reference = score_table(small_transactions.frame, registry.champion.scorer).table
    assert len(records) == len(reference)
    ours = np.array([records[str(t)].score for t in reference["TRANSACTION_ID"]])
    np.testing.assert_allclose(ours, reference["score"].to_numpy(), rtol=0, atol=1e-5)
    decisions = [records[str(t)].decision.value for t in reference["TRANSACTION_ID"]]
    assert decisions == list(reference["decision"])
    assert {r.model_version for r in records.values()} == {"test-a"}
    # The terminal risk features took part: some terminal saw frauds in its window.
    frauds = reference.loc[small_transactions.frame["TX_FRAUD"] == 1]
    assert len(frauds) > 10


@pytest.mark.integration
async def test_a_redelivered_batch_changes_nothing_and_scores_the_same(
    store: RedisStateStore, served_model: Path, small_transactions: Dataset
) -> None:
    registry = _registry(served_model)
    pipeline = ScoringPipeline(store, registry, registry.metrics)
    events, _ = _events_in_replay_order(small_transactions.frame)
    await pipeline.process(events[:300])
    batch = events[300:400]
    first = await pipeline.process(batch)
    snapshot = await _dump(store)
    again = await pipeline.process(batch)
    assert await _dump(store) == snapshot
    assert again.duplicate.all() and not first.duplicate.any()
    for a, b in zip(first.records, again.records, strict=True):
        assert a.model_dump(exclude={"scored_at"}) == b.model_dump(exclude={"scored_at"})
    events_total = registry.metrics.events
    assert events_total.labels("duplicate")._value.get() == len(batch)
    assert events_total.labels("scored")._value.get() == 400


@pytest.mark.integration
async def test_records_are_written_as_the_schema_writes_them(
    store: RedisStateStore, served_model: Path, small_transactions: Dataset
) -> None:
    registry = _registry(served_model)
    pipeline = ScoringPipeline(store, registry, registry.metrics)
    events, _ = _events_in_replay_order(small_transactions.frame)
    scored = await pipeline.process(events[:500])
    assert scored.keys == [e.customer_id.encode() for e in events[:500]]
    for event, payload in zip(events, scored.payloads, strict=False):
        record = ScoreRecord.from_json(payload)  # validates every field
        assert record.to_json() == payload  # same fields, order and number formatting
        assert record.transaction_id == event.transaction_id
        assert record.event_time == iso_utc_millis(event.event_time_s)
        assert record.amount == event.amount
    assert scored.model_version == "test-a"


def test_batch_event_times_format_like_one_event() -> None:
    # Sub-millisecond parts are truncated, as ``epoch_ms`` and ``iso_utc_millis`` do.
    moments = [
        datetime(2018, 4, 1, 0, 3, 12, 500999, tzinfo=UTC),
        datetime(2031, 12, 31, tzinfo=UTC),
    ]
    expected = [iso_utc_millis(epoch_ms(m) / 1000) for m in moments]
    assert utc_millis([epoch_ms(m) for m in moments]) == expected
    assert expected[0] == "2018-04-01T00:03:12.500Z"


async def _dump(store: RedisStateStore) -> dict[bytes, object]:
    client = store.client
    out: dict[bytes, object] = {}
    async for key in client.scan_iter(match=f"{store.prefix}:*", count=1000):
        kind = await client.type(key)
        out[key] = await (client.hgetall(key) if kind == b"hash" else client.get(key))
    return out


@pytest.mark.integration
async def test_alerts_carry_reasons_from_one_extra_model_call(
    store: RedisStateStore, served_model: Path, small_transactions: Dataset
) -> None:
    registry = _registry(served_model)
    pipeline = ScoringPipeline(store, registry, registry.metrics, max_reasons=2)
    scorer = registry.champion.scorer
    calls: list[int] = []
    real_score = scorer.raw_scores

    def counting_score(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        calls.append(len(batch))
        return real_score(batch)

    scorer.raw_scores = counting_score  # type: ignore[method-assign,assignment]
    events, _ = _events_in_replay_order(small_transactions.frame)
    alerts: list[ScoreRecord] = []
    for start in range(0, 1200, 200):
        calls.clear()
        scored = await pipeline.process(events[start : start + 200])
        batch_alerts = [scored.records[i] for i in scored.alerts]
        alerts.extend(batch_alerts)
        # one call for the batch, one for every alert's variants (each feature group
        # occluded, each earlier transaction removed), none per event
        variants = len(FEATURE_GROUPS) + TEST_SEQUENCE_LENGTH - 1
        expected = [200] + ([len(batch_alerts) * variants] if batch_alerts else [])
        assert calls == expected
        for i, record in enumerate(scored.records):
            assert (i in scored.alerts) == (record.decision is not Decision.APPROVE)
            assert bool(record.reasons) == (i in scored.alerts)
    assert alerts, "the test model's thresholds should alert on some events"
    for record in alerts:
        assert 1 <= len(record.reasons) <= 2
        kinds = {a.kind for a in record.attributions}
        assert "features" in kinds, record.attributions
        assert [a.log_odds for a in record.attributions] == sorted(
            (a.log_odds for a in record.attributions), reverse=True
        )
    # Large amounts are what this model learnt; their reasons quote the amount.
    big = [r for r in alerts if r.amount > 200]
    assert big and all(any(f"{r.amount:,.2f}" in text for text in r.reasons) for r in big)
    counted = registry.metrics.alerts
    assert counted.labels("review")._value.get() + counted.labels("decline")._value.get() == len(
        alerts
    )


@pytest.mark.integration
async def test_the_challenger_scores_every_event_in_shadow(
    store: RedisStateStore, served_model: Path, second_model: Path, small_transactions: Dataset
) -> None:
    registry = _registry(served_model, second_model)
    pipeline = ScoringPipeline(store, registry, registry.metrics)
    events, _ = _events_in_replay_order(small_transactions.frame)
    scored = await pipeline.process(events[:150])
    assert [r.transaction_id for r in scored.shadow] == [r.transaction_id for r in scored.records]
    assert {r.model_version for r in scored.shadow} == {"test-b"}
    assert all(r.reasons == () for r in scored.shadow)
    assert any(a.score != b.score for a, b in zip(scored.records, scored.shadow, strict=True))


@pytest.mark.integration
async def test_an_event_the_model_cannot_score_is_set_aside_and_the_rest_scored(
    store: RedisStateStore,
    poisoned_model: Path,
    served_model: Path,
    small_transactions: Dataset,
) -> None:
    # The champion outputs NaN for these amounts (valid under the contract): a model fault.
    registry = _registry(poisoned_model, served_model)
    pipeline = ScoringPipeline(store, registry, registry.metrics)
    events, _ = _events_in_replay_order(small_transactions.frame)
    batch = events[:200]
    poisoned = {17, 90, 91}
    batch = [
        e.model_copy(update={"amount": POISON_AMOUNT * 2}) if i in poisoned else e
        for i, e in enumerate(batch)
    ]
    scored = await pipeline.process(batch)
    assert scored.unscorable == sorted(poisoned)
    kept = [e for i, e in enumerate(batch) if i not in poisoned]
    assert [r.transaction_id for r in scored.records] == [e.transaction_id for e in kept]
    assert scored.keys == [e.customer_id.encode() for e in kept]
    assert all(0.0 <= r.score <= 1.0 for r in scored.records)
    # The challenger (a sound model) scores the kept events in shadow, keyed alike.
    assert [r.transaction_id for r in scored.shadow] == [e.transaction_id for e in kept]
    assert scored.shadow_keys == scored.keys
    assert registry.metrics.events.labels("unscorable")._value.get() == len(poisoned)
    # The other events score as they would in a batch without the poisoned ones.
    alone = await ScoringPipeline(store, _registry(served_model), registry.metrics).process(kept)
    assert alone.duplicate.all()  # same state: redelivered, so their first inputs come back


def test_checked_scores_finds_the_rows_that_make_a_model_call_fail() -> None:
    calls: list[int] = []

    def fragile(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        calls.append(len(batch))
        if (batch[:, 0, 0] < 0).any():  # a call fails outright on any such row
            raise RuntimeError("cannot score")
        return np.full(len(batch), 0.25)

    batch = np.ones((16, 2, 3), dtype=np.float32)
    batch[[3, 11], 0, 0] = -1.0
    scores, ok = checked_scores(fragile, batch)
    assert ok.tolist() == [i not in (3, 11) for i in range(16)]
    assert np.all(scores[ok] == 0.25) and np.isnan(scores[~ok]).all()
    assert len(calls) < 16  # bisected, not row by row


@pytest.mark.integration
async def test_labels_count_once_and_invalid_ones_are_rejected(
    store: RedisStateStore, small_transactions: Dataset
) -> None:
    metrics = WorkerMetrics(CollectorRegistry(), process_collectors=False)
    at = 1_522_540_992_000
    await store.apply_transactions(
        [TransactionUpdate(tx, "2", "3", at, 10.0) for tx in ("1", "4", "5")]
    )
    fraud = label_json(1, 2, 3, at, True, 1_522_627_392_000)
    genuine = label_json(4, 2, 3, at, False, 1_522_627_392_000)
    broken = b'{"transaction_id": "9", "is_fraud": "yes"}'
    elsewhere = label_json(5, 2, 7, at, True, 1_522_627_392_000)
    unknown = label_json(6, 2, 3, at, True, 1_522_627_392_000)
    outcome = await apply_labels(
        _inbound([fraud, genuine, broken, fraud, elsewhere, unknown]),
        store,
        DEFAULT_LIMITS,
        metrics,
    )
    assert (outcome.frauds, outcome.genuine, outcome.new_frauds) == (4, 1, 1)
    assert [r.error.reason for r in outcome.rejected] == [
        RejectReason.MISSING_FIELD,
        RejectReason.LABEL_MISMATCH,
    ]
    assert outcome.rejected[1].message.value == elsewhere
    values = {
        o: metrics.labels.labels(o)._value.get()
        for o in ("fraud", "genuine", "duplicate", "mismatch", "pending", "dead_letter")
    }
    assert values == {
        "fraud": 1,
        "genuine": 1,
        "duplicate": 1,
        "mismatch": 1,
        "pending": 1,
        "dead_letter": 2,
    }
    hour = at // F.MS_PER_HOUR
    assert await store.terminal_counts("3", hour) == (3, 1, 3, 1)


@pytest.mark.integration
async def test_a_label_whose_transaction_never_comes_is_dead_lettered_as_it_came(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    metrics = WorkerMetrics(CollectorRegistry(), process_collectors=False)
    store = RedisStateStore(redis_client, prefix=redis_prefix, label_wait_s=0.0)
    unknown = label_json(6, 2, 3, 1_522_540_992_000, True, 1_522_627_392_000)
    [message] = _inbound([unknown])
    await apply_labels([message], store, DEFAULT_LIMITS, metrics)
    rejected, ids = await expired_labels(store, 0.0, metrics)
    assert [(r.message, r.error.reason) for r in rejected] == [
        (message, RejectReason.LABEL_UNKNOWN_TRANSACTION)
    ]
    assert [e.transaction_id for e in ids] == ["6"]
    await store.drop_pending(ids)
    assert await expired_labels(store, 0.0, metrics) == ([], [])


# --- reasons -------------------------------------------------------------------------


def _context(**values: float) -> AlertContext:
    vector = np.zeros(F.N_FEATURES)
    for name, value in values.items():
        vector[F.FEATURE_INDEX[name]] = value
    amount = values.get("TX_AMOUNT", 10.0)
    return AlertContext(0.9, amount, 1_522_540_992_000, vector)


def test_reasons_follow_the_largest_contributions_with_actual_values() -> None:
    context = _context(
        TX_AMOUNT=512.30,
        AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY=5.1,
        CUSTOMER_ID_NB_TX_30DAY_WINDOW=40,
        TERMINAL_ID_NB_TX_30DAY_WINDOW=27,
        TERMINAL_ID_RISK_30DAY_WINDOW=4 / 27,
        TX_DURING_NIGHT=1,
    )
    mean = np.ones(F.N_FEATURES)
    mean[F.FEATURE_INDEX["TX_AMOUNT"]] = 50.0
    terminal = next(g for g in FEATURE_GROUPS if g.name == "terminal_risk")
    usual = next(g for g in FEATURE_GROUPS if g.name == "amount_vs_usual")

    def model(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        # A transparent "model": terminal risk counts most, the amount ratio next.
        last = batch[:, -1, :].astype(np.float64)
        risk = last[:, terminal.index].sum(axis=1) > 26
        ratio = last[:, usual.index[0]] > 2
        scores: npt.NDArray[np.float64] = 0.1 + 0.5 * risk + 0.3 * ratio
        return scores

    sequences = context.features[None, None, :].astype(np.float32)
    scores = model(sequences)
    (reasons,) = explain(sequences, scores, [context], mean, model, max_reasons=3)
    assert reasons == (
        "terminal had 4 known frauds in 27 transactions over 30 days",
        "amount 512.30 is 5.1x the customer's 30-day average (100)",
    )


def test_a_score_saturated_by_two_signals_names_both() -> None:
    context = _context(TX_AMOUNT=900.0, AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY=9.0)
    mean = np.ones(F.N_FEATURES)
    mean[F.FEATURE_INDEX["TX_AMOUNT"]] = 50.0
    amount = F.FEATURE_INDEX["TX_AMOUNT"]
    ratio = F.FEATURE_INDEX["AMOUNT_TO_CUSTOMER_PRIOR_AVG_30DAY"]

    def model(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        # Either signal alone gives 0.9999; both together 0.99999999: occluding one barely
        # moves the probability, but it moves the log-odds by over 4.
        last = batch[:, -1, :].astype(np.float64)
        logit = -6.0 + 15.0 * (last[:, amount] > 220) + 15.0 * (last[:, ratio] > 3)
        return 1 / (1 + np.exp(-logit))

    sequences = context.features[None, None, :].astype(np.float32)
    (reasons,) = explain(sequences, model(sequences), [context], mean, model, max_reasons=2)
    # Both signals are about the amount: one reason states it once with both comparisons.
    assert reasons == (
        "amount 900.00 is 18x the average transaction (50.00) and the customer's first in 30 days",
    )


def test_every_alert_gets_a_reason_even_when_no_group_stands_out() -> None:
    context = _context(TX_AMOUNT=20.0)

    def flat(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return np.full(len(batch), 0.7)

    sequences = context.features[None, None, :].astype(np.float32)
    (reasons,) = explain(sequences, np.array([0.7]), [context], np.zeros(F.N_FEATURES), flat)
    assert reasons == (fallback_reason(context.score),)
    assert MIN_CONTRIBUTION > 0


def test_feature_groups_cover_every_feature_once() -> None:
    covered = [name for group in FEATURE_GROUPS for name in group.features]
    assert sorted(covered) == sorted(F.FEATURE_NAMES)


# --- metrics -------------------------------------------------------------------------

REQUIRED_METRICS = (
    "fraudstream_events_total",
    "fraudstream_alerts_total",
    "fraudstream_dead_letters_total",
    "fraudstream_labels_total",
    "fraudstream_end_to_end_latency_seconds_bucket",
    "fraudstream_processing_seconds_bucket",
    "fraudstream_inference_seconds_bucket",
    "fraudstream_redis_seconds_bucket",
    "fraudstream_batch_size_bucket",
    "fraudstream_score_bucket",
    "fraudstream_score_psi",
    "fraudstream_model_info",
    "fraudstream_model_reloads_total",
    "fraudstream_consumer_lag",
    "fraudstream_last_commit_timestamp_seconds",
    "fraudstream_offsets_committed_total",
    "fraudstream_redis_errors_total",
    "fraudstream_kafka_errors_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
)


def test_every_metric_is_declared_on_the_registry_passed_in() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.consumer_lag.labels("transactions", "0").set(3)
    metrics.model_info.labels("v1", "champion").set(1)
    text = generate_latest(registry).decode()
    for name in REQUIRED_METRICS:
        assert f"\n{name}" in text or text.startswith(name), name
    score_buckets = [f'le="{edge}"' for edge in SCORE_BUCKET_EDGES]
    assert all(f"fraudstream_score_bucket{{{b}}}" in text for b in score_buckets)
    assert 'fraudstream_events_total{outcome="dead_letter"} 0.0' in text


def test_psi_is_zero_on_the_reference_and_grows_with_drift() -> None:
    reference = np.full(len(SCORE_BUCKET_EDGES), 1 / len(SCORE_BUCKET_EDGES))
    assert population_stability_index(reference, reference) == 0.0
    drift = ScoreDrift(list(reference), window=1300)
    rng = np.random.default_rng(0)
    like_reference = rng.choice(np.asarray(SCORE_BUCKET_EDGES) - 1e-4, size=1300)
    assert drift.update(like_reference) < 0.05
    shifted = drift.update(np.full(1300, 0.95))  # the whole window now in one bucket
    assert shifted > 1.0
    # The window slides: recent normal scores bring it back down.
    assert drift.update(like_reference) < 0.05


def test_psi_waits_for_enough_scores() -> None:
    drift = ScoreDrift([1 / 13] * 13, window=5000)
    assert np.isnan(drift.update(np.linspace(0, 1, 999)))
    assert not np.isnan(drift.update(np.linspace(0, 1, 1)))


# --- model registry ------------------------------------------------------------------


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


async def test_a_pointer_file_flip_is_loaded_and_swapped_between_batches(
    tmp_path: Path, served_model: Path, second_model: Path
) -> None:
    pointer = tmp_path / "current"
    pointer.write_text("models/a\n")
    models = tmp_path / "models"
    models.mkdir()
    _copy_model(served_model, models / "a")
    _copy_model(second_model, models / "b")
    registry = _registry(pointer)
    assert registry.champion.version == "test-a"
    assert resolve_model_dir(pointer) == (models / "a").resolve()

    await registry.poll()
    assert registry.activate_pending() == []  # nothing changed
    pointer.write_text(str(models / "b"))
    await registry.poll()
    assert registry.champion.version == "test-a"  # parked until the next batch boundary
    assert registry.activate_pending() == ["champion test-a -> test-b"]
    assert registry.champion.version == "test-b"
    text = generate_latest(registry.metrics.registry).decode()
    assert 'fraudstream_model_info{role="champion",version="test-b"} 1.0' in text
    assert 'version="test-a"' not in text
    assert 'fraudstream_model_reloads_total{outcome="loaded"} 2.0' in text


async def test_a_broken_model_is_refused_and_the_current_one_keeps_serving(
    tmp_path: Path, served_model: Path
) -> None:
    live = _copy_model(served_model, tmp_path / "live")
    registry = _registry(live)
    card = live / CARD_FILE
    card.write_text(card.read_text().replace('"test-a"', '"test-c"'))  # probe scores still match
    (live / "model.onnx").write_bytes(b"corrupt")  # but the model file no longer does
    await registry.poll()
    assert registry.activate_pending() == []
    assert registry.champion.version == "test-a"
    reloads = registry.metrics.model_reloads
    assert reloads.labels("refused")._value.get() == 1
    await registry.poll()  # the same broken files are not retried
    assert reloads.labels("refused")._value.get() == 1


def test_models_needing_a_longer_history_than_the_state_keeps_are_refused(
    served_model: Path,
) -> None:
    with pytest.raises(ModelError, match="FRAUDSTREAM_STATE_SEQUENCE_LENGTH"):
        load_model(served_model, "champion", ModelOptions(max_sequence_length=2))


def test_models_trained_on_other_feature_definitions_are_refused(
    tmp_path: Path, served_model: Path
) -> None:
    old = _copy_model(served_model, tmp_path / "old")
    card = json.loads((old / CARD_FILE).read_text())
    del card["feature_version"]  # a card from before the field: version 1, day windows
    (old / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="version 1 of the feature definitions"):
        load_model(old, "champion", ModelOptions())


def test_threshold_overrides_apply_to_the_champion_only(
    served_model: Path, second_model: Path
) -> None:
    registry = _registry(served_model, second_model, review_threshold=0.2)
    assert registry.champion.thresholds.review == 0.2
    assert registry.champion.thresholds.review_rule == "FRAUDSTREAM_REVIEW_THRESHOLD"
    challenger = registry.challenger
    assert challenger is not None
    assert challenger.thresholds == challenger.scorer.card.thresholds
    with pytest.raises(ModelError, match="contradicts"):
        load_model(
            served_model, "champion", ModelOptions(review_threshold=1.0, decline_threshold=0.5)
        )


def test_a_missing_champion_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        _registry(tmp_path / "nowhere")


def test_a_broken_challenger_is_refused_at_start_up(tmp_path: Path, served_model: Path) -> None:
    registry = _registry(served_model, tmp_path / f"missing-{uuid.uuid4().hex}")
    assert registry.challenger is None
    assert registry.metrics.model_reloads.labels("refused")._value.get() == 1


def test_observe_many_counts_like_observe_one_by_one() -> None:
    from stream_app.metrics import LATENCY_BUCKETS_S, observe_many

    rng = np.random.default_rng(3)
    # Values on the bucket bounds themselves, between them, below the first and past the last.
    values = np.concatenate(
        [np.asarray(SCORE_BUCKET_EDGES, dtype=np.float64), rng.random(500), [0.0, 1.0]]
    )
    latencies = np.concatenate([np.asarray(LATENCY_BUCKETS_S), rng.exponential(0.05, 500), [99.0]])
    one, many = CollectorRegistry(), CollectorRegistry()
    by_one, by_many = WorkerMetrics(one), WorkerMetrics(many)
    for value in values.tolist():
        by_one.score.observe(value)
    for value in latencies.tolist():
        by_one.end_to_end_latency.observe(value)
    observe_many(by_many.score, values)
    observe_many(by_many.end_to_end_latency, latencies)
    observe_many(by_many.score, np.zeros(0))
    for name in ("fraudstream_score", "fraudstream_end_to_end_latency_seconds"):
        for suffix in ("_bucket", "_count"):
            samples = [
                (s.labels, s.value)
                for m in one.collect()
                for s in m.samples
                if s.name == name + suffix
            ]
            assert samples == [
                (s.labels, s.value)
                for m in many.collect()
                for s in m.samples
                if s.name == name + suffix
            ]
        total = [s.value for m in one.collect() for s in m.samples if s.name == name + "_sum"]
        assert total == pytest.approx(
            [s.value for m in many.collect() for s in m.samples if s.name == name + "_sum"]
        )
