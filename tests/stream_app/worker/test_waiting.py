"""A broker that is not there yet: the worker says where it looks, and keeps waiting.

In production the broker may come up after the worker (a rolling restart, a new cluster),
so an unreachable broker is not a configuration error: the worker retries. What a new user
needs from it is one plain line per try naming the address and the setting it came from,
no other noise, and after 30 s a line saying it is still waiting, so that a typo in the
address is found by reading the log, not by guessing. When the broker comes, it starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream_app.backoff import STILL_WAITING_AFTER_S
from tests.kafka_fixtures import delete_state, new_settings
from training.ops.services.bundled_broker import BundledBroker
from training.ops.services.net import LOOPBACK, free_port
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_broker_that_comes_later_is_waited_for_one_plain_line_per_try(
    tmp_path: Path,
) -> None:
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    settings = new_settings(address, retry_backoff_max_s=4.0)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        with worker.start(until=("fraudstream_ready", 0.0)):
            time.sleep(STILL_WAITING_AFTER_S + 4)
            assert worker.process is not None and worker.process.poll() is None, worker.log()
            log = worker.log_path.read_text(errors="replace")
            loud = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
            tries = [line for line in loud if "retrying in" in line]
            waiting = [line for line in loud if "still waiting after" in line]
            named = f"connecting to Kafka at {address} (FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS)"
            assert len(tries) >= 8, log
            assert all(named in line for line in tries), log
            assert all(line.count("KafkaConnectionError") == 1 for line in tries), log
            assert len(waiting) == 1 and named in waiting[0], log
            assert set(loud) == set(tries) | set(waiting), "no other warning or error while waiting"

            broker = BundledBroker(port, log_path=tmp_path / "broker.log")
            broker.start()
            try:
                worker.wait_for("fraudstream_ready", 1.0, timeout_s=60)
                assert f"{named} succeeded again after" in worker.log(), worker.log()
                assert worker.terminate() == 0, worker.log()
            finally:
                worker.__exit__()  # killed if still running, before its broker goes
                broker.stop()
    finally:
        delete_state(settings.state_key_prefix)
