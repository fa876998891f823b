"""The two references ``fraudstream bench`` compares the worker with, as processes.

* **naive**: what a tutorial would write. A Faust agent that, for each event, parses it,
  reads and writes its customer's and terminal's state in Redis with plain commands (six
  round trips: GET, HMGET, SET, HINCRBY x 2, PEXPIRE), makes one ONNX Runtime call, and
  sends one score record. Same features as the worker (terminal day totals and hour
  counters in a hash, not packed), no alert reasons.
* **limit**: the floor cost of the transport and the model. Raw aiokafka ``getmany`` and
  one ONNX Runtime call per batch (on a batch of the right shape), no parsing, no state,
  no output: no worker that consumes from Kafka and scores with this model can beat it.
* **relay**: the latency floor of the transport. Consumes the transactions topic with the
  worker's consumer settings and produces every message, unchanged, to the scores topic
  with the worker's producer settings: the same two broker hops as the worker, with no
  work in between. No worker can answer faster than this relay on the same broker.

Each runs as ``python -m training.ops.bench_references {naive,limit,relay} --progress FILE``
with the worker's ``FRAUDSTREAM_*`` settings, writes its event count to ``FILE`` every
10 ms (``ready`` once it consumes), and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import numpy as np
import redis.asyncio as aioredis

from stream_app import features
from stream_app.config import Settings, load_settings, settings_environment
from stream_app.errors import RejectedEvent
from stream_app.kafka import config as kafka_config
from stream_app.models.registry import resolve_model_dir
from stream_app.models.scorer import OnnxScorer
from stream_app.records import ScoreRecord, TransactionEvent, iso_utc_millis, parse_transaction
from stream_app.scoring.decisions import decide
from stream_app.scoring.pipeline import epoch_ms
from stream_app.state.store import ENTRY_DTYPE, history_from_records, retained, transaction_hash
from training.ops.bench import Subject

PROGRESS_INTERVAL_S: Final = 0.01
KINDS: Final = ("naive", "limit", "relay")


class Progress:
    """An event count, written atomically to a file at most every :data:`PROGRESS_INTERVAL_S`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events = 0
        self.ready = False
        self._written = 0.0

    def add(self, n: int) -> None:
        """Count ``n`` more events (0: only write the count if it is due)."""
        self.events += n
        if time.monotonic() - self._written >= PROGRESS_INTERVAL_S:
            self.write()

    def write(self) -> None:
        """Write the count now."""
        self._written = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"events": self.events, "ready": self.ready}))
        os.replace(tmp, self.path)


def start_reference(kind: str, settings: Settings, workdir: Path) -> Subject:
    """Start a reference process on the worker's settings and topics."""
    progress = workdir / f"{kind}.progress.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")},
        **settings_environment(settings),
        "FRAUDSTREAM_METRICS_PORT": "0",
    }
    command = [
        sys.executable,
        "-m",
        "training.ops.bench_references",
        kind,
        "--progress",
        str(progress),
    ]
    return Subject(kind, command, env, workdir / f"{kind}.log", progress_path=progress)


# --- limit ----------------------------------------------------------------------------


async def run_limit(settings: Settings, progress: Progress) -> None:
    """Consume the transactions topic from the start, one model call per batch, until SIGTERM."""
    from aiokafka import AIOKafkaConsumer

    scorer = OnnxScorer(resolve_model_dir(settings.model_dir))
    size = settings.batch_size
    inputs = np.zeros((size, scorer.sequence_length, len(features.FEATURE_NAMES)), np.float32)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = AIOKafkaConsumer(
        settings.topic_transactions,
        **kafka_config.consumer_kwargs(settings, f"{settings.group_id}.limit"),
    )
    await consumer.start()
    try:
        wait_ms = max(1, int(settings.batch_max_wait_s * 1000))
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=wait_ms, max_records=size)
            n = sum(len(records) for records in batch.values())
            if n:
                scorer.score(inputs[:n])
            progress.add(n)
    finally:
        progress.write()
        await consumer.stop()


# --- relay ----------------------------------------------------------------------------


async def run_relay(settings: Settings, progress: Progress) -> None:
    """Copy the transactions topic to the scores topic, message by message, until SIGTERM.

    The consumer takes every partition by assignment (no group join to wait for) from the
    end, so only what is produced after it starts is relayed; acknowledgements are awaited
    batch by batch off the polling path, as the worker does.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = AIOKafkaConsumer(**kafka_config.consumer_kwargs(settings, None))
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    await producer.start()
    await consumer.start()
    outputs = len(await producer.partitions_for(settings.topic_scores))
    # The producer asks the brokers for these topics' metadata, and waits until they have it.
    sources = await producer.partitions_for(settings.topic_transactions)
    partitions = [TopicPartition(settings.topic_transactions, p) for p in sorted(sources)]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for tp in partitions:
        await consumer.position(tp)
    progress.ready = True
    progress.write()
    acks: list[asyncio.Future[object]] = []
    try:
        wait_ms = max(1, int(settings.batch_max_wait_s * 1000))
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=wait_ms, max_records=settings.batch_size)
            n = 0
            for tp, records in batch.items():
                for r in records:
                    acks.append(
                        await producer.send(
                            settings.topic_scores,
                            r.value,
                            key=r.key,
                            partition=tp.partition % outputs,
                        )
                    )
                n += len(records)
            if len(acks) > 10_000:
                await asyncio.gather(*acks)
                acks.clear()
            progress.add(n)
    finally:
        progress.write()
        await consumer.stop()
        await producer.stop()


# --- naive ----------------------------------------------------------------------------


class NaiveState:
    """The worker's state, read and written with one Redis command at a time: customer
    histories as the worker packs them, terminal counters as hash fields."""

    def __init__(self, client: aioredis.Redis, prefix: str, sequence_length: int) -> None:
        self.client = client
        self.prefix = prefix
        self.sequence_length = sequence_length
        self.ttl_ms = 45 * features.MS_PER_DAY
        self.windows = features.terminal_window_days(features.LABEL_DELAY_DAYS)

    async def apply(self, tx: TransactionEvent) -> features.HistoryBatch:
        """Append one transaction to its customer's history; returns the history."""
        customer_key = f"{self.prefix}:c:{tx.customer_id}"
        terminal_key = f"{self.prefix}:t:{tx.terminal_id}"
        blob = await self.client.get(customer_key) or b""
        assert isinstance(blob, bytes)  # the client does not decode responses
        entries = np.frombuffer(blob, dtype=ENTRY_DTYPE)
        digest = transaction_hash(tx.transaction_id)
        seen = np.flatnonzero(entries["tx_hash"] == digest)
        if seen.size:
            return history_from_records([entries[: seen[0] + 1]])
        time_ms = epoch_ms(tx.timestamp)
        hour = time_ms // features.MS_PER_HOUR
        day, hour_of_day = divmod(hour, features.HOURS_PER_DAY)
        # Each window: day totals of the days between its first and last day, hour counters
        # of its first day from this hour of day on and of its last day before it.
        windows = [
            [
                *(f"d{d}" for d in range(day + first + 1, day + last)),
                *(f"h{(day + first) * 24 + h}" for h in range(hour_of_day, 24)),
                *(f"h{(day + last) * 24 + h}" for h in range(hour_of_day)),
            ]
            for first, last in self.windows
        ]
        cells = sorted({cell for window in windows for cell in window})
        fields = [f"{kind}{cell}" for cell in cells for kind in ("t", "f")]
        values = [int(v or 0) for v in await self.client.hmget(terminal_key, fields)]
        counts = {cell: (values[2 * i], values[2 * i + 1]) for i, cell in enumerate(cells)}
        entry = np.zeros(1, dtype=ENTRY_DTYPE)
        entry["time_ms"], entry["amount"], entry["tx_hash"] = time_ms, tx.amount, digest
        for w, window in enumerate(windows):
            entry["terminal_tx"][0, w] = sum(counts[cell][0] for cell in window)
            entry["terminal_fraud"][0, w] = sum(counts[cell][1] for cell in window)
        entries = retained(np.concatenate([entries, entry]), self.sequence_length)
        await self.client.set(customer_key, entries.tobytes(), px=self.ttl_ms)
        await self.client.hincrby(terminal_key, f"td{day}", 1)
        await self.client.hincrby(terminal_key, f"th{hour}", 1)
        await self.client.pexpire(terminal_key, self.ttl_ms)
        return history_from_records([entries])


async def create_topic(settings: Settings, name: str) -> None:
    """Create a topic of the worker's partition count, unless it exists (brokers such as
    the compose file's Apache Kafka create none by themselves)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        topic = NewTopic(name, settings.topic_partitions, settings.topic_replication_factor)
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([topic])
    finally:
        await admin.close()


def run_naive(settings: Settings, progress: Progress) -> int:
    """A Faust worker scoring one event at a time, until SIGTERM; returns its exit code."""
    import faust

    scorer = OnnxScorer(resolve_model_dir(settings.model_dir))
    thresholds = scorer.card.thresholds
    app = faust.App(
        f"{settings.group_id}-naive",
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        autodiscover=False,
        datadir=Path(tempfile.gettempdir()) / f"fraudstream-{settings.group_id}-naive",
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.consumer_session_timeout_s,
        broker_rebalance_timeout=settings.consumer_session_timeout_s,
        broker_heartbeat_interval=settings.consumer_session_timeout_s / 3,
    )
    source = app.topic(settings.topic_transactions)
    asyncio.run(create_topic(settings, f"{settings.topic_scores}.naive"))
    scores = app.topic(f"{settings.topic_scores}.naive")
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    state = NaiveState(client, f"{settings.state_key_prefix}-naive", scorer.sequence_length)

    @app.agent(source, name="naive")
    async def score(stream: faust.StreamT[bytes]) -> None:
        async for value in stream:
            try:
                tx = parse_transaction(value)
            except RejectedEvent:
                continue
            history = await state.apply(tx)
            _, sequences = features.online_features(history, scorer.sequence_length)
            probability = scorer.score(sequences.astype(np.float32))
            record = ScoreRecord.model_construct(
                transaction_id=tx.transaction_id,
                customer_id=tx.customer_id,
                terminal_id=tx.terminal_id,
                amount=tx.amount,
                event_time=iso_utc_millis(tx.event_time_s),
                score=float(probability[0]),
                decision=decide(probability, thresholds)[0],
                reasons=(),
                model_version=scorer.version,
                scored_at=iso_utc_millis(time.time()),
            )
            await scores.send(key=tx.customer_id.encode(), value=record.to_json())
            progress.add(1)

    async def flush() -> None:
        progress.add(0)

    app.timer(PROGRESS_INTERVAL_S)(flush)  # the count is written while idle too

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = faust.Worker(app, loop=loop, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    finally:
        progress.write()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m training.ops.bench_references {naive,limit} --progress FILE``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--progress", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = load_settings()
    progress = Progress(args.progress)
    progress.write()
    if args.kind in ("limit", "relay"):
        run = run_limit if args.kind == "limit" else run_relay
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(settings, progress))
        return 0
    return run_naive(settings, progress)


if __name__ == "__main__":
    sys.exit(main())
