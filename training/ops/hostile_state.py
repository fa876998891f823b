"""What a hostile producer can do to the scores through the state, measured.

Runs the scoring pipeline (the worker's state store on a redis-server of its own, the
features, the serving model) over simulated Handbook data, then feeds it:

1. a transaction id already used, for 9,999.00 at another terminal (and the same payment
   under a fresh id, for comparison);
2. 0, 20 and 1,000 fake fraud labels for transaction ids never seen, on a clean terminal,
   then a probe payment there (the customer's median amount, 8 days later);
3. a 50-byte value at the probe customer's key, then a hash at the probe terminal's key.

It prints one JSON object: the records published for each (score, decision), or the error
that stopped the batch. Only the state store's public calls and the pipeline are used, so
the same file measures an older checkout too::

    python -m training.ops.hostile_state
    PYTHONPATH=/tmp/before python training/ops/hostile_state.py   # a worktree of another commit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from stream_app.metrics import WorkerMetrics
from stream_app.models.registry import ModelOptions, ModelRegistry
from stream_app.records import DEFAULT_LIMITS, TransactionEvent, transaction_json
from stream_app.scoring.pipeline import Inbound, ScoringPipeline, validate_transactions
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import LabelUpdate
from training.ops.services.net import LOOPBACK
from training.ops.services.redis_server import RedisServer
from training.simulator import SimulatorConfig, simulate
from training.transactions import to_arrays

_DAY_MS: Final = 86_400_000
Row = tuple[int, int, int, int, float]  # transaction, customer, terminal, time_ms, amount


def _events(rows: Sequence[Row]) -> list[TransactionEvent]:
    inbound = [Inbound("tx", 0, i, None, transaction_json(*r), 0) for i, r in enumerate(rows)]
    accepted, rejected = validate_transactions(inbound, DEFAULT_LIMITS)
    if rejected:
        raise ValueError(f"the simulated events should be valid: {rejected[0].error}")
    return [a.event for a in accepted]


def _published(records: Sequence[Any]) -> list[list[Any]]:
    return [[round(r.score, 4), r.decision.value, list(r.reasons[:1])] for r in records]


async def _measure(model: Path, port: int) -> dict[str, Any]:
    frame = simulate(SimulatorConfig(n_customers=300, n_terminals=600, n_days=40, seed=3))
    a = to_arrays(frame)
    order = np.lexsort((a.transaction_ids, a.times_ms))
    rows: list[Row] = [
        (
            int(a.transaction_ids[i]),
            int(a.customer_ids[i]),
            int(a.terminal_ids[i]),
            int(a.times_ms[i]),
            float(a.amounts[i]),
        )
        for i in order
    ]
    metrics = WorkerMetrics(CollectorRegistry(), process_collectors=False)
    models = ModelRegistry(model, None, ModelOptions(), metrics)
    models.load_initial()
    client = aioredis.Redis(host=LOOPBACK, port=port)
    out: dict[str, Any] = {}

    async def replayed(prefix: str) -> tuple[RedisStateStore, ScoringPipeline]:
        length = models.champion.sequence_length
        store = RedisStateStore(client, prefix=prefix, sequence_length=length)
        pipeline = ScoringPipeline(store, models, metrics)
        for start in range(0, len(rows), 500):
            await pipeline.process(_events(rows[start : start + 500]))
        return store, pipeline

    async def attempt(pipeline: ScoringPipeline, row: Row) -> Any:
        try:
            scored = await asyncio.wait_for(pipeline.process(_events([row])), 10)
        except Exception as exc:  # what stopped the batch is the measurement
            return f"{type(exc).__name__}: {str(exc)[:90]}"
        return _published(scored.records)

    try:
        last = rows[-1]
        later = last[3] + 1000
        first, elsewhere = rows[100], rows[200][2]
        _, pipeline = await replayed("reuse")
        out["reused_id"] = await attempt(pipeline, (first[0], first[1], elsewhere, later, 9999.0))
        out["same_payment_fresh_id"] = await attempt(
            pipeline, (10**9, first[1], elsewhere, later, 9999.0)
        )
        median = float(np.median([r[4] for r in rows if r[1] == last[1]]))
        probe: Row = (10**9 + 1, last[1], last[2], later, median)
        for n in (0, 20, 1000):
            store, pipeline = await replayed(f"fakes{n}")
            fakes = [
                LabelUpdate(f"fake-{i}", "x", str(last[2]), later - 8 * _DAY_MS, True)
                for i in range(n)
            ]
            await store.apply_labels(fakes)
            out[f"probe_after_{n}_fake_labels"] = await attempt(pipeline, probe)
        store, pipeline = await replayed("corrupt")
        await client.set(store.customer_key(str(last[1])), b"x" * 50)
        out["probe_after_corrupt_customer_key"] = await attempt(pipeline, probe)
        await client.delete(store.terminal_key(str(last[2])))
        await client.hset(store.terminal_key(str(last[2])), "field", "value")
        out["probe_after_corrupt_terminal_key"] = await attempt(pipeline, (10**9 + 2, *probe[1:]))
    finally:
        await client.aclose()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("onnx_models/default"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work, RedisServer(Path(work), durable=False) as server:
        started = time.monotonic()
        result = asyncio.run(_measure(args.model.resolve(), server.port))
        result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
