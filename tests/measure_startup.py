"""Start-up time of the real worker: start -> ``fraudstream_ready`` 1, start -> first score.

Not a test (no assertion on a machine-dependent figure): the figures behind the start-up
target, measured on a broker of its own with the shipped model, a fresh group, topics and
key prefix per run, and a few transactions published before the worker starts::

    python -m tests.measure_startup --broker bundled --runs 3
    python -m tests.measure_startup --broker kafka --runs 3

Another checkout's worker is measured with ``PYTHONPATH=<checkout>`` (the worker
subprocess inherits it). Prints each run and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from stream_app.metrics import WorkerMetrics
from stream_app.worker import app as worker_module
from tests.kafka_fixtures import Broker, delete_state, new_settings
from tests.resilience_helpers import (
    own_broker,
    publish,
    read_records,
    simulated,
    transaction_messages,
)
from training.ops.services.worker_process import WorkerProcess

MODEL_DIR = Path(__file__).resolve().parents[1] / "onnx_models" / "default"
PUBLISHED = 20


def measure_once(broker: Broker, work_dir: Path, session_s: float) -> tuple[float, float]:
    """One cold start: (seconds to ready, seconds to the first score record)."""
    settings = new_settings(broker, model_dir=MODEL_DIR, consumer_session_timeout_s=session_s)
    try:
        # Topics first (as a deployment has them), then a few transactions waiting.
        asyncio.run(worker_module.prepare(settings, WorkerMetrics(CollectorRegistry())))
        frame = simulated(n_customers=20, n_days=3, seed=3)
        publish(settings, transaction_messages(frame, settings, limit=PUBLISHED))
        started = time.time()
        with WorkerProcess(settings, work_dir / f"{settings.group_id}.log") as worker:
            worker.start(timeout_s=120)
            ready = time.time() - started
            records = read_records(settings, settings.topic_scores, timeout_s=60)
            assert records, worker.log()
            # The record's timestamp is the worker's clock when it produced it.
            first = min(r.timestamp for r in records) / 1000 - started
            worker.terminate()
        return ready, first
    finally:
        delete_state(settings.state_key_prefix)


def main() -> None:
    """Measure ``--runs`` cold starts on a broker of ``--broker``'s kind; print medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("bundled", "kafka"), default="bundled")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-dir", type=Path, help="keep the worker logs there")
    # The bundled broker holds a new group's first join for half the session timeout.
    parser.add_argument("--session-timeout-s", type=float, default=6.0, help="as in the tests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        work_dir = args.log_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        server = own_broker(args.broker, work_dir)
        try:
            broker = Broker(args.broker, server.bootstrap_servers)
            runs = []
            for i in range(args.runs):
                ready, first = measure_once(broker, work_dir, args.session_timeout_s)
                print(f"run {i + 1}: ready {ready:.2f} s, first score {first:.2f} s", flush=True)
                runs.append((ready, first))
        finally:
            server.stop()
    print(
        f"{args.broker}: median of {len(runs)}: ready "
        f"{statistics.median(r for r, _ in runs):.2f} s, first score "
        f"{statistics.median(f for _, f in runs):.2f} s"
    )


if __name__ == "__main__":
    main()
