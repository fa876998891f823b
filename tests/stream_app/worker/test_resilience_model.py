"""Corrupt models dropped for hot reload are refused; the serving model keeps serving.

The worker serves ``FRAUDSTREAM_MODEL_DIR``, here a symlink flipped atomically as a deploy
would. Four bad deploys, between replay slices, each of which must be refused without a
single event lost or scored by anything but the serving model:

1. the serving directory's ``model.onnx`` overwritten in place with half of itself;
2. a directory whose ``model.onnx`` is garbage, its card's SHA-256 updated to match
   (so ONNX Runtime itself must refuse it);
3. a valid ONNX graph with other weights under the first model's card, SHA-256 updated
   (so only the card's probe scores can tell);
4. a directory whose card is not JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stream_app.config import Settings
from stream_app.models.scorer import file_sha256
from tests.kafka_fixtures import Dataset
from tests.resilience_helpers import (
    account,
    chunks,
    publish,
    read_records,
    score_records,
    transaction_ids,
    transaction_messages,
    wait_until,
)
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience, pytest.mark.slow]

REFUSED = 'fraudstream_model_reloads_total{outcome="refused"}'


def _with_onnx(source: Path, target: Path, onnx: bytes) -> Path:
    """A copy of ``source`` whose model file is ``onnx``, its card's checksum matching."""
    shutil.copytree(source, target)
    (target / "model.onnx").write_bytes(onnx)
    card = json.loads((target / "model_card.json").read_text())
    card["model_sha256"] = file_sha256(target / "model.onnx")
    (target / "model_card.json").write_text(json.dumps(card))
    return target


def _flip(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a new symlink renamed over the old)."""
    staging = link.with_name(link.name + ".new")
    staging.symlink_to(target, target_is_directory=True)
    os.replace(staging, link)


def test_corrupt_models_are_refused_and_the_serving_model_keeps_serving(
    make_settings: Callable[..., Settings],
    served_model: Path,
    second_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    serving = models / "a"
    shutil.copytree(served_model, serving)
    onnx = (served_model / "model.onnx").read_bytes()

    def overwritten_in_place() -> None:
        (serving / "model.onnx").write_bytes(onnx[: len(onnx) // 2])

    def not_onnx() -> None:
        _flip(current, _with_onnx(served_model, models / "b", b"\x08\x07garbage" * 512))

    def other_weights() -> None:
        other = (second_model / "model.onnx").read_bytes()
        _flip(current, _with_onnx(served_model, models / "c", other))

    def card_not_json() -> None:
        _flip(current, _card_not_json(served_model, models / "d"))

    deploys = [
        ("overwritten in place", overwritten_in_place),
        ("not ONNX", not_onnx),
        ("other weights", other_weights),
        ("card not JSON", card_not_json),
    ]
    current = tmp_path / "current"
    current.symlink_to(serving, target_is_directory=True)
    settings = make_settings(model_dir=current, model_poll_interval_s=0.2)
    messages = transaction_messages(small_transactions.frame, settings)
    ids = transaction_ids(messages)
    slices = list(chunks(messages, len(messages) // (len(deploys) + 1) + 1))
    assert len(slices) == len(deploys) + 1

    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        assert worker.process is not None
        pid = worker.process.pid
        published = 0
        for step, (name, deploy) in enumerate(deploys, start=1):
            publish(settings, slices[step - 1])
            published += len(slices[step - 1])
            worker.wait_for('fraudstream_events_total{outcome="scored"}', published, 60)
            deploy()
            wait_until(
                lambda step=step: (worker.metric(REFUSED) or 0) >= step,
                30,
                f"the worker to refuse the model {name}",
            )
        publish(settings, slices[-1])
        worker.wait_for('fraudstream_events_total{outcome="scored"}', len(messages), 60)
        metrics = worker.scrape()
        log = worker.log()
        assert worker.process.pid == pid and worker.process.poll() is None  # never died
        assert worker.terminate() == 0, log

    records = score_records(read_records(settings, settings.topic_scores))
    accounting = account(records, ids)
    accounting.assert_complete()
    assert accounting.duplicates == 0
    assert {r.model_version for r in records} == {"test-a"}
    assert metrics[REFUSED] == len(deploys)
    assert metrics['fraudstream_model_reloads_total{outcome="loaded"}'] == 1  # at start-up
    assert metrics['fraudstream_model_info{role="champion",version="test-a"}'] == 1
    assert log.count("refused the champion model") == len(deploys)
    assert "test-a keeps serving" in log
    assert "Traceback" not in log


def _card_not_json(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "model_card.json").write_text('{"version": "broken", ')
    return target
