"""The model watcher cannot die: a poisoned pointer is refused, and a later valid model loads.

The worker serves ``FRAUDSTREAM_MODEL_DIR``, here a pointer file. It is poisoned three ways
while the worker scores: bytes that are not UTF-8, a symlink loop in its place, and a path
to a directory that has been removed. Each is logged and counted as a refused reload,
once; then a valid model is deployed and serves the next events.

Only the bundled broker lane: the watcher reads files and swaps models between
micro-batches; it shares no code with the Kafka client settings that differ between the
lanes (exactly-once, the idempotent producer), so the Apache Kafka lane would test
nothing more here.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.config import Settings
from tests.kafka_fixtures import Broker, Dataset, delete_state, new_settings
from tests.resilience_helpers import (
    publish,
    read_records,
    score_records,
    transaction_ids,
    transaction_messages,
    wait_until,
)
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience]

REFUSED = 'fraudstream_model_reloads_total{outcome="refused"}'
LOADED = 'fraudstream_model_reloads_total{outcome="loaded"}'
SCORED = 'fraudstream_events_total{outcome="scored"}'


@pytest.fixture
def settings(bundled_broker: Broker, tmp_path: Path) -> Iterator[Settings]:
    made = new_settings(bundled_broker, model_dir=tmp_path / "current", model_poll_interval_s=0.2)
    yield made
    delete_state(made.state_key_prefix)


def _replace(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a regular file holding ``data``."""
    staging = path.with_name(f"{path.name}.{uuid.uuid4().hex[:6]}")
    staging.write_bytes(data)
    os.replace(staging, path)


def test_a_poisoned_pointer_never_stops_the_watcher(
    settings: Settings,
    served_model: Path,
    second_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    pointer = settings.model_dir
    models = tmp_path / "models"
    shutil.copytree(served_model, models / "a")
    shutil.copytree(second_model, models / "b")
    shutil.copytree(served_model, models / "gone")
    _replace(pointer, f"{models / 'a'}\n".encode())

    def not_utf8() -> None:
        _replace(pointer, b"\xff\xfe/models/\xc3(\n")

    def symlink_loop() -> None:
        staging = pointer.with_name("loop.new")
        staging.symlink_to(pointer.name)  # the pointer, once renamed, points at itself
        os.replace(staging, pointer)

    def vanished() -> None:
        _replace(pointer, f"{models / 'gone'}\n".encode())
        shutil.rmtree(models / "gone")

    poisons = [("not UTF-8", not_utf8), ("symlink loop", symlink_loop), ("vanished", vanished)]
    messages = transaction_messages(small_transactions.frame, settings)
    first, second = messages[: len(messages) // 2], messages[len(messages) // 2 :]

    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        assert worker.process is not None
        publish(settings, first)
        worker.wait_for(SCORED, len(first), 60)
        for step, (name, poison) in enumerate(poisons, start=1):
            poison()
            wait_until(
                lambda step=step: (worker.metric(REFUSED) or 0) >= step,
                20,
                f"the worker to refuse the pointer ({name})",
            )
        # A lasting error is one refusal, not one per poll (the watcher polls every 0.2 s).
        time.sleep(1.0)
        refused_before = worker.metric(REFUSED)
        _replace(pointer, f"{models / 'b'}\n".encode())
        wait_until(lambda: (worker.metric(LOADED) or 0) >= 2, 30, "the valid model to load")
        publish(settings, second)
        worker.wait_for(SCORED, len(messages), 60)
        metrics = worker.scrape()
        log = worker.log_path.read_text(errors="replace")
        assert worker.process.poll() is None  # never died
        assert worker.terminate() == 0, log

    assert refused_before == len(poisons)
    assert metrics[REFUSED] == len(poisons)
    assert metrics['fraudstream_model_info{role="champion",version="test-b"}'] == 1
    assert "is not UTF-8 text" in log and "Symlink loop" in log and "does not exist" in log
    assert log.count("refused the champion model") == len(poisons)
    assert log.count("still watching") == len(poisons)
    assert "Traceback" not in log

    records = score_records(read_records(settings, settings.topic_scores))
    version: dict[str, str] = {}
    for record in records:  # the first record of each (a redelivery may follow)
        version.setdefault(record.transaction_id, record.model_version)
    assert {version[i] for i in transaction_ids(second)} == {"test-b"}
    assert {version[i] for i in transaction_ids(first)} == {"test-a"}
