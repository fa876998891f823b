"""Model hot reload in a running worker: a refused model, then a swap, during a replay."""

from __future__ import annotations

import asyncio
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stream_app.config import Settings
from stream_app.models.scorer import OnnxScorer
from stream_app.records import ScoreRecord
from tests.kafka_fixtures import Dataset, read_topic
from tests.stream_app.worker.test_replay import probe_labels, publish, stream
from training.ops.services.worker_process import WorkerProcess
from training.score_file import score_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_model_swap_during_a_replay_loses_nothing_and_names_its_version(
    make_settings: Callable[..., Settings],
    served_model: Path,
    second_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    shutil.copytree(served_model, models / "a")
    shutil.copytree(second_model, models / "b")
    shutil.copytree(served_model, models / "broken")
    (models / "broken" / "model.onnx").write_bytes(b"not a model")
    pointer = tmp_path / "current"
    pointer.write_text("models/a\n")
    settings = make_settings(model_dir=pointer, model_poll_interval_s=0.3)
    frame = small_transactions.frame
    n = len(frame)
    messages = stream(frame, settings, labels_delay=None, detour=False)
    labels = [m for m in messages if m.topic == settings.topic_labels]
    rest = [m for m in messages if m.topic != settings.topic_labels]

    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        probe_labels(settings, worker)
        asyncio.run(publish(settings, labels, rate=10_000))
        # Before their transactions, labels wait for them (the probe's too).
        worker.wait_for(
            'fraudstream_labels_total{outcome="pending"}', int(frame["TX_FRAUD"].sum()) + 1
        )
        steps: list[str] = []

        def deploy(_published: int) -> None:
            scored = worker.metric('fraudstream_events_total{outcome="scored"}') or 0
            if not steps and scored > n / 4:
                pointer.write_text("models/broken\n")  # refused: a keeps serving
                steps.append("broken")
            elif (
                steps == ["broken"]
                and (worker.metric('fraudstream_model_reloads_total{outcome="refused"}') or 0) >= 1
            ):
                pointer.write_text(str(models / "b"))
                steps.append("b")

        asyncio.run(publish(settings, rest, rate=700, on_progress=deploy))
        assert steps == ["broken", "b"], worker.log()
        records = asyncio.run(read_topic(settings, settings.topic_scores, until=n))
        metrics = worker.scrape()
        assert worker.terminate() == 0

    scores = [ScoreRecord.from_json(m.value) for m in records]
    assert sorted(r.transaction_id for r in scores) == sorted(
        str(t) for t in frame["TRANSACTION_ID"]
    )
    by_version: dict[str, list[ScoreRecord]] = defaultdict(list)
    for record in scores:
        by_version[record.model_version].append(record)
    assert set(by_version) == {"test-a", "test-b"}, "the swap happened mid-stream"
    for version, directory in (("test-a", models / "a"), ("test-b", models / "b")):
        reference = score_table(frame, OnnxScorer(directory)).table
        expected = dict(
            zip(reference["TRANSACTION_ID"].astype(str), reference["score"], strict=True)
        )
        ours = np.array([r.score for r in by_version[version]])
        theirs = np.array([expected[r.transaction_id] for r in by_version[version]])
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    # Swapped between batches: in each partition, every record after the first test-b one
    # is test-b too.
    for partition in {m.partition for m in records}:
        versions = [
            ScoreRecord.from_json(m.value).model_version
            for m in records
            if m.partition == partition
        ]
        first_b = versions.index("test-b")
        assert set(versions[first_b:]) == {"test-b"}
    assert metrics['fraudstream_model_reloads_total{outcome="refused"}'] >= 1
    assert metrics['fraudstream_model_reloads_total{outcome="loaded"}'] == 2
    assert metrics['fraudstream_model_info{role="champion",version="test-b"}'] == 1
