"""One card's burst through the real worker: time, rate, memory, and what others wait.

Card testing looks like thousands of transactions of one card in minutes. This runs the
worker (a subprocess, on the bundled broker and a redis-server of the run's own, one
partition so everything shares it) through three phases on Handbook data
(``data/tx.parquet``, in event-time order) and writes what it measured as JSON::

    1. usual     a backlog of background events           -> the worker's usual events/s
    2. backlog   a card's burst mixed with background,    -> events/s during the burst,
                 published as fast as possible               time to score the card's events
    3. paced     another card's burst inside paced          -> the other customers' score
                 background, at a quarter of the usual rate  latency during the burst

Rates are ``(n - 1) / (last score - first score)`` with score times taken when a consumer
of the scores topic holds the record; a latency runs from handing the event to the
producer to that moment. After each phase: the worker's RSS (``VmRSS``, peak ``VmHWM``),
the card's Redis key (``STRLEN`` and ``MEMORY USAGE``) and Redis ``used_memory``.

``--worker-src`` runs the worker of another checkout (e.g. ``git worktree add /tmp/before
HEAD``) against the same harness, so one command measures before and after::

    python -m training.ops.bench_burst --label before --worker-src /tmp/before
    python -m training.ops.bench_burst --label after

Each run replaces its label's entry in ``--out`` (default ``runs/reports/burst.json``; the
README's is ``training/reports/burst.json``).
Every wait is bounded (``--drain-timeout``); processes and keys go at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
import pandas as pd
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream_app.config import Settings
from stream_app.errors import ConfigError
from stream_app.kafka import config as kafka_config
from training.ops.bench import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    BenchOptions,
    Subject,
    bench_settings,
    delete_prefix,
    machine_info,
    memory_mib,
    own_redis,
    percentiles_ms,
    start_worker,
    wait_ready,
    wait_scoring,
)
from training.ops.replay import ReplayMessage, ensure_input_topics, replay_messages
from training.ops.services.brokers import local_broker
from training.outputs import REPORTS

DEFAULT_OUT: Final = REPORTS / "burst.json"
_GAP_MS: Final = 1_500  # mean time between a burst card's transactions (event time)


@dataclass(frozen=True)
class BurstOptions:
    """What one run measures (see ``--help``)."""

    label: str
    worker_src: Path | None = None
    model_dir: Path = DEFAULT_MODEL
    data: Path = DEFAULT_DATA
    burst: int = 20_000
    usual: int = 20_000
    background: int = 20_000
    paced_load: float = 0.25
    drain_timeout_s: float = 600.0
    workdir: Path = Path("/tmp")


def phase_frames(options: BurstOptions) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The three phases' transactions: consecutive slices of the data in event-time order,
    the two bursts (cards of their own) spread over their phase's time range."""
    from training.transactions import read_transactions

    frame = read_transactions(options.data).sort_values(["TX_DATETIME", "TRANSACTION_ID"])
    n = options.usual + 2 * options.background
    if len(frame) < n:
        raise ConfigError(f"{options.data} holds {len(frame):,} transactions, need {n:,}")
    frame = frame.iloc[:n].reset_index(drop=True)
    usual = frame.iloc[: options.usual]
    rng = np.random.default_rng(13)
    next_tx = int(frame["TRANSACTION_ID"].max()) + 1
    phases = [usual]
    for k in range(2):
        start = options.usual + k * options.background
        background = frame.iloc[start : start + options.background]
        # The card's transactions follow each other ~1.5 s apart (event time), from a tenth
        # of the way into the phase: its background events come before, during and after.
        first = background["TX_DATETIME"].iloc[len(background) // 10]
        gaps = rng.exponential(_GAP_MS, options.burst).astype(np.int64)
        burst = pd.DataFrame(
            {
                "TRANSACTION_ID": np.arange(next_tx, next_tx + options.burst),
                "TX_DATETIME": first + pd.to_timedelta(np.cumsum(gaps), unit="ms"),
                "CUSTOMER_ID": np.int64(burst_card(k)),
                "TERMINAL_ID": rng.integers(0, int(frame["TERMINAL_ID"].max()) + 1, options.burst),
                "TX_AMOUNT": np.round(rng.uniform(0.5, 5.0, options.burst), 2),
                "TX_TIME_SECONDS": 0,
                "TX_TIME_DAYS": 0,
                "TX_FRAUD": np.int8(1),
                "TX_FRAUD_SCENARIO": np.int8(0),
            }
        )
        next_tx += options.burst
        phases.append(pd.concat([background, burst], ignore_index=True))
    return phases[0], phases[1], phases[2]


def burst_card(phase: int) -> int:
    """The customer id of a phase's burst card (above every Handbook customer id)."""
    return 90_000_000 + phase


class ScoreTimes:
    """When each transaction was handed to the producer and when its score record arrived."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sent: dict[str, float] = {}
        self.scored: dict[str, float] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ScoreTimes:
        consumer = AIOKafkaConsumer(
            **kafka_config.client_kwargs(self.settings),
            group_id=None,
            fetch_max_wait_ms=5,
            max_poll_records=10_000,
        )
        await consumer.start()
        tp = TopicPartition(self.settings.topic_scores, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._receive(consumer))
        return self

    async def _receive(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=50)
            now = time.time()
            for records in batch.values():
                for r in records:
                    self.scored.setdefault(orjson.loads(r.value or b"{}")["transaction_id"], now)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def publish(self, messages: Sequence[ReplayMessage], rate: float = 0.0) -> None:
        """Send in order, as fast as possible or at ``rate`` a second (5 ms slices)."""
        producer = AIOKafkaProducer(**kafka_config.producer_kwargs(self.settings))
        await producer.start()
        try:
            started = time.monotonic()
            acks: list[asyncio.Future[Any]] = []
            for i, message in enumerate(messages):
                if rate and i % max(1, round(rate * 0.005)) == 0:
                    ahead = i / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                self.sent[orjson.loads(message.value)["transaction_id"]] = time.time()
                acks.append(await producer.send(message.topic, message.value, key=message.key))
                if len(acks) >= 5_000:
                    await asyncio.gather(*acks)
                    acks.clear()
            await asyncio.gather(*acks)
        finally:
            await producer.stop()

    async def drain(self, ids: Sequence[str], timeout_s: float) -> bool:
        """Until every id is scored, or the timeout; whether all were."""
        deadline = time.monotonic() + timeout_s
        while not all(i in self.scored for i in ids):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    def rate(self, ids: Sequence[str]) -> float | None:
        """Events/s over these ids' score times."""
        times = sorted(self.scored[i] for i in ids if i in self.scored)
        if len(times) < 2 or times[-1] <= times[0]:
            return None
        return round((len(times) - 1) / (times[-1] - times[0]), 1)

    def latency_ms(self, ids: Sequence[str]) -> dict[str, float]:
        """p50 / p99 / max of send-to-score latency of these ids (those scored)."""
        lat = [self.scored[i] - self.sent[i] for i in ids if i in self.scored and i in self.sent]
        p50, _, p99, worst = percentiles_ms(lat)
        return {"p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "max_ms": round(worst, 1)}


def _messages(settings: Settings, frame: pd.DataFrame) -> list[ReplayMessage]:
    return list(
        replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
        )
    )


def _ids(frame: pd.DataFrame, card: int | None = None, others: bool = False) -> list[str]:
    rows = frame.sort_values(["TX_DATETIME", "TRANSACTION_ID"])
    if card is not None:
        is_card = rows["CUSTOMER_ID"] == card
        rows = rows[~is_card] if others else rows[is_card]
    return [str(i) for i in rows["TRANSACTION_ID"]]


async def _snapshot(settings: Settings, worker: Subject, card: int) -> dict[str, float]:
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        key = f"{settings.state_key_prefix}:c:{card}"
        usage = await client.memory_usage(key)
        length = await client.strlen(key)
        info = await client.info("memory")
    finally:
        await client.aclose()
    return {
        "worker_rss_mib": round(memory_mib(worker.pid, "VmRSS"), 1),
        "worker_peak_rss_mib": round(memory_mib(worker.pid, "VmHWM"), 1),
        "card_key_bytes": int(length),
        "card_key_memory_usage_bytes": int(usage or 0),
        "redis_used_memory_mib": round(float(info["used_memory"]) / 2**20, 1),
    }


async def run(options: BurstOptions, say: Any = print) -> dict[str, Any]:
    """Run the three phases; stops its processes and deletes its keys whatever happens."""
    tag = uuid.uuid4().hex[:8]
    workdir = options.workdir / f"fraudstream-burst-{tag}"
    workdir.mkdir(parents=True)
    usual, backlog, paced = phase_frames(options)
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "worker_src": str(options.worker_src or Path.cwd()),
        "machine": machine_info(),
        "data": str(options.data),
        "burst": options.burst,
        "load_average_before": round(os.getloadavg()[0], 2),
    }
    with contextlib.ExitStack() as services:
        bootstrap = services.enter_context(local_broker("bundled", workdir))
        redis_url = services.enter_context(own_redis(workdir))
        bench = BenchOptions(model_dir=options.model_dir, partitions=1)
        settings = bench_settings(bootstrap, bench, tag, redis_url)
        result["settings"] = {
            "partitions": 1,
            "batch_size": settings.batch_size,
            "batch_max_wait_s": settings.batch_max_wait_s,
            "broker": "bundled",
            "redis": "own",
        }
        await ensure_input_topics(settings)
        times = ScoreTimes(settings)
        say(f"phase 1: {len(usual):,} background events as a backlog")
        await times.publish(_messages(settings, usual))
        worker = start_worker(settings, workdir / "worker.log", source=options.worker_src)
        try:
            await wait_ready([worker])
            await wait_scoring(worker)
            async with times:  # reads the scores topic from its start
                ids = _ids(usual)
                done = await times.drain(ids, options.drain_timeout_s)
                usual_rate = times.rate(ids)
                result["usual"] = {"events": len(ids), "complete": done, "events_per_s": usual_rate}
                say(f"  usual rate {usual_rate} events/s")

                say(f"phase 2: a {options.burst:,}-event burst in {options.background:,} others")
                card = burst_card(0)
                ids = _ids(backlog)
                card_ids = _ids(backlog, card)
                started = time.time()
                await times.publish(_messages(settings, backlog))
                done = await times.drain(ids, options.drain_timeout_s)
                scored_card = [times.scored[i] for i in card_ids if i in times.scored]
                result["backlog"] = {
                    "events": len(ids),
                    "complete": done,
                    "events_per_s": times.rate(ids),
                    "card_scored": len(scored_card),
                    "card_seconds": round(max(scored_card) - started, 2) if scored_card else None,
                    "card_events_per_s": times.rate(card_ids),
                    "others_latency": times.latency_ms(_ids(backlog, card, others=True)),
                    **await _snapshot(settings, worker, card),
                }
                say(f"  {json.dumps(result['backlog'])}")
                if not done:
                    say("  not drained in time: the paced phase is skipped")
                    return result

                rate = (usual_rate or 1000.0) * options.paced_load
                say(f"phase 3: another burst in paced background, {rate:,.0f} events/s")
                card = burst_card(1)
                ids = _ids(paced)
                card_ids = _ids(paced, card)
                others = _ids(paced, card, others=True)
                await times.publish(_messages(settings, paced), rate=rate)
                done = await times.drain(ids, options.drain_timeout_s)
                sent_card = sorted(times.sent[i] for i in card_ids)
                during = [i for i in others if sent_card[0] <= times.sent[i] <= sent_card[-1]]
                outside = sorted(set(others) - set(during))
                scored_card = [times.scored[i] for i in card_ids if i in times.scored]
                result["paced"] = {
                    "offered_per_s": round(rate, 1),
                    "events": len(ids),
                    "complete": done,
                    "card_publish_seconds": round(sent_card[-1] - sent_card[0], 2),
                    "card_seconds": round(max(scored_card) - sent_card[0], 2)
                    if scored_card
                    else None,
                    "others_latency_during_burst": times.latency_ms(during),
                    "others_latency_outside_burst": times.latency_ms(outside),
                    **await _snapshot(settings, worker, card),
                }
                say(f"  {json.dumps(result['paced'])}")
        finally:
            worker.stop()
            await delete_prefix(settings, settings.state_key_prefix)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run once and merge the result into the report under its label."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--label", required=True, help="report entry, e.g. before / after")
    parser.add_argument("--worker-src", type=Path, help="checkout whose worker runs")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--background", type=int, default=20_000)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    options = BurstOptions(
        label=args.label,
        worker_src=args.worker_src.resolve() if args.worker_src else None,
        model_dir=args.model_dir.resolve(),
        data=args.data,
        burst=args.burst,
        usual=args.background,
        background=args.background,
        drain_timeout_s=args.drain_timeout,
    )
    result = asyncio.run(run(options))
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report[args.label] = result
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out} ({args.label})")


if __name__ == "__main__":
    main()
