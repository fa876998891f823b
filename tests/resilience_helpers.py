"""What the resilience tests share: services they own, a paced publisher, and an accounting.

* :func:`own_broker`: a broker of the test's own, which it may kill, restart, SIGSTOP and
  SIGCONT without disturbing the session services other tests use (a Redis server of its
  own: :class:`training.ops.services.redis_server.RedisServer`);
* :class:`BackgroundPublisher`: publishes at a set rate from a thread, so the test's main
  thread can kill and restart workers meanwhile;
* :func:`account`: the end of every resilience test, every transaction accounted for:
  which were scored, which were lost, and whether the duplicates are identical;
* :func:`make_certificates`: a CA and a server certificate for 127.0.0.1, with openssl;
* :func:`run_worker_to_exit`: a worker expected to stop by itself, bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from stream_app.config import Settings
from stream_app.kafka import config as kafka_config
from stream_app.records import ScoreRecord
from stream_app.state.redis import RedisStateStore
from stream_app.state.store import TransactionUpdate
from training.ops.replay import replay_messages
from training.ops.services.apache_kafka import ApacheKafka
from training.ops.services.brokers import BrokerKind
from training.ops.services.bundled_broker import BundledBroker
from training.ops.services.worker_process import worker_command, worker_environment
from training.simulator import SimulatorConfig, simulate
from training.transactions import to_arrays


def own_broker(kind: BrokerKind, work_dir: Path) -> BundledBroker | ApacheKafka:
    """A broker of ``kind`` owned by one test, started: it may be paused (SIGSTOP) and
    resumed without stalling any other test. Stop it with ``.stop()``."""
    broker: BundledBroker | ApacheKafka
    if kind == "kafka":
        broker = ApacheKafka(root=work_dir / "kafka")
    else:
        broker = BundledBroker(log_path=work_dir / "broker.log")
    broker.start()
    return broker


@dataclass(frozen=True)
class Message:
    """One message to publish; ``partition`` None lets the producer's partitioner pick."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None


def simulated(n_customers: int, n_days: int, seed: int) -> pd.DataFrame:
    """A small population over many days: cheap state, long customer histories."""
    return simulate(
        SimulatorConfig(
            n_customers=n_customers,
            n_terminals=2 * n_customers,
            n_days=n_days,
            radius=10.0,
            seed=seed,
            compromised_terminals_per_day=1,
            terminal_compromise_days=7,
            compromised_customers_per_day=1,
            customer_compromise_days=7,
        )
    )


def transaction_messages(
    frame: pd.DataFrame, settings: Settings, limit: int | None = None
) -> list[Message]:
    """The table's transactions in event-time order, keyed by customer id; no labels."""
    return [
        Message(m.topic, m.key, m.value)
        for m in replay_messages(
            frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            limit=limit,
        )
    ]


def label_messages(frame: pd.DataFrame, settings: Settings, transactions: int) -> list[Message]:
    """Every verdict (fraud and genuine) on the first ``transactions`` of the table in
    replay order, keyed by customer id, as ``fraudstream replay --all-labels`` sends them."""
    messages = replay_messages(
        frame,
        transactions_topic=settings.topic_transactions,
        labels_topic=settings.topic_labels,
        labels_delay=timedelta(seconds=1),
        all_labels=True,
        limit=transactions,
    )
    return [Message(m.topic, m.key, m.value) for m in messages if m.topic == settings.topic_labels]


class BackgroundPublisher:
    """Publishes messages at ``rate`` a second from a thread of its own.

    ``published`` counts acknowledged messages; :meth:`join` waits for the end and
    re-raises any error of the thread.
    """

    def __init__(self, settings: Settings, messages: Sequence[Message], rate: float) -> None:
        self.settings = settings
        self.messages = messages
        self.rate = rate
        self.published = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> BackgroundPublisher:
        """Start publishing."""
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    async def _publish(self) -> None:
        producer = AIOKafkaProducer(**kafka_config.producer_kwargs(self.settings))
        await producer.start()
        try:
            started = time.monotonic()
            step = max(1, int(self.rate / 100))  # 10 ms slices
            for start in range(0, len(self.messages), step):
                futures = [
                    await producer.send(m.topic, m.value, key=m.key, partition=m.partition)
                    for m in self.messages[start : start + step]
                ]
                await asyncio.gather(*futures)
                self.published = start + len(futures)
                ahead = self.published / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await producer.stop()

    def wait_for(self, count: int, timeout_s: float = 120.0) -> None:
        """Until ``count`` messages are acknowledged."""
        deadline = time.monotonic() + timeout_s
        while self.published < count and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"published {self.published} of {count} in {timeout_s} s")
            time.sleep(0.05)
        if self.error is not None:
            raise self.error

    def join(self, timeout_s: float = 180.0) -> None:
        """Until everything is published."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        assert not self._thread.is_alive(), f"publishing took over {timeout_s} s"


async def _read_records(
    settings: Settings, topic: str, ids: set[str] | None, timeout_s: float, committed: bool
) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        topic,
        **kafka_config.client_kwargs(settings),
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    missing = set(ids) if ids is not None else set()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for partition_records in batch.values():
                for r in partition_records:
                    records.append(r)
                    if missing and r.value is not None:
                        missing.discard(str(orjson.loads(r.value).get("transaction_id")))
            if missing:
                continue
            assigned = consumer.assignment()
            positions = [(await consumer.position(tp), consumer.highwater(tp)) for tp in assigned]
            if len(assigned) >= len(partitions) and all(
                high is not None and position >= high for position, high in positions
            ):
                break
    finally:
        await consumer.stop()
    return records


def read_records(
    settings: Settings,
    topic: str,
    *,
    ids: Iterable[str] | None = None,
    timeout_s: float = 120.0,
    committed: bool | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the start to its end, once ``ids`` all have a record.

    Under exactly-once only committed transactions are read (``committed`` None follows
    the settings), as a downstream reader would; ``committed=False`` also shows records of
    aborted transactions. Returns what was read by the timeout: the caller's accounting
    says what is missing.
    """
    if committed is None:
        committed = settings.exactly_once
    ids_left = set(ids) if ids else None
    return asyncio.run(_read_records(settings, topic, ids_left, timeout_s, committed))


def score_records(records: Iterable[ConsumerRecord[bytes, bytes]]) -> list[ScoreRecord]:
    """The ``ScoreRecord`` of each message."""
    return [ScoreRecord.from_json(r.value) for r in records if r.value is not None]


def transaction_ids(messages: Iterable[Message]) -> list[str]:
    """The transaction id of each (valid) transaction message."""
    return [str(orjson.loads(m.value)["transaction_id"]) for m in messages if m.value]


def publish(settings: Settings, messages: Sequence[Message], rate: float = 20_000) -> None:
    """Publish everything (fast by default) and return when it is acknowledged."""
    BackgroundPublisher(settings, messages, rate).start().join()


@dataclass
class Accounting:
    """Every transaction of a run accounted for."""

    expected: int
    scored: int
    records: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        """Records published more than once (after a crash, a retry or a redelivery)."""
        return self.records - self.scored

    def assert_complete(self) -> None:
        """Nothing lost, nothing invented, every duplicate identical to its first copy."""
        assert not self.missing, f"{len(self.missing)} transactions lost: {self.missing[:5]}"
        assert not self.unexpected, f"records for unknown ids: {self.unexpected[:5]}"
        assert not self.inconsistent, f"duplicates that differ: {self.inconsistent[:5]}"


# ONNX Runtime's kernels depend on the batch size, so the same sequence scored in another
# micro-batch (a redelivery, a retry after a crash) may differ in the last float32 bits
# (~1e-7 seen). Duplicates must agree to the model's parity tolerance, and exactly in
# every other field but ``scored_at``.
SCORE_TOLERANCE = 1e-5


def identity(record: ScoreRecord) -> dict[str, Any]:
    """A record without ``scored_at`` (the only field a re-published copy may change) and
    without its score (compared within :data:`SCORE_TOLERANCE` by :func:`same_record`)."""
    return record.model_dump(exclude={"scored_at", "score"})


def same_record(a: ScoreRecord, b: ScoreRecord) -> bool:
    """Whether ``b`` is a faithful copy of ``a``."""
    return identity(a) == identity(b) and abs(a.score - b.score) <= SCORE_TOLERANCE


def account(records: Iterable[ScoreRecord], expected_ids: Iterable[str]) -> Accounting:
    """Compare the score records of a run with the transactions published."""
    first: dict[str, ScoreRecord] = {}
    inconsistent: list[str] = []
    n = 0
    for record in records:
        n += 1
        seen = first.setdefault(record.transaction_id, record)
        if seen is not record and not same_record(seen, record):
            inconsistent.append(record.transaction_id)
    expected = set(expected_ids)
    return Accounting(
        expected=len(expected),
        scored=len(first),
        records=n,
        missing=sorted(expected - set(first)),
        unexpected=sorted(set(first) - expected),
        inconsistent=inconsistent,
    )


def redis_state(client: redis.Redis, prefix: str) -> dict[str, object]:
    """Every key under a prefix, without the prefix, with its value (TTLs ignored).

    Left out: pending labels, which keep their message's provenance (topic, offset), and
    the state marker, which names the run that created the state: both differ between two
    runs of the same stream."""
    state: dict[str, object] = {}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        name = key.decode()[len(prefix) :]
        if name.startswith((":lp:", ":lpq", ":marker")):
            continue
        kind = client.type(key)
        if kind == b"hash":
            state[name] = client.hgetall(key)
        elif kind == b"zset":
            state[name] = client.zrange(key, 0, -1)  # members only: scores are deadlines
        else:
            state[name] = client.get(key)
    return state


def uninterrupted_state(
    url: str, prefix: str, frame: pd.DataFrame, sequence_length: int, limit: int | None = None
) -> None:
    """Apply the table's transactions in event-time order, in batches, under ``prefix``.

    The state after a stream does not depend on how it was cut into batches, nor on how
    partitions interleave within a few days of event time (terminal windows end eight days
    back): this is the state an uninterrupted worker leaves.
    """
    import redis.asyncio as aioredis

    from training.ops.replay import replay_order

    arrays = to_arrays(frame)
    order = replay_order(frame)[:limit]
    updates = [
        TransactionUpdate(
            str(arrays.transaction_ids[i]),
            str(arrays.customer_ids[i]),
            str(arrays.terminal_ids[i]),
            int(arrays.times_ms[i]),
            float(arrays.amounts[i]),
        )
        for i in order
    ]

    async def apply() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            store = RedisStateStore(client, prefix=prefix, sequence_length=sequence_length)
            for start in range(0, len(updates), 1000):
                await store.apply_transactions(updates[start : start + 1000])
        finally:
            await client.aclose()

    asyncio.run(apply())


def delete_keys(client: redis.Redis, prefix: str) -> None:
    """Delete every key under a prefix."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def make_certificates(directory: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate it signs for 127.0.0.1 and localhost.

    Returns:
        ``(ca_cert, server_cert, server_key)``, PEM files in ``directory``.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / f"{name}.key", directory / f"{name}.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        f"/CN=fraudstream test {name}", "-keyout", str(ca_key), "-out", str(ca_cert))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(key), "-out", str(csr))  # fmt: skip
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca_cert, cert, key


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def environment_without_settings() -> dict[str, str]:
    """This process's environment minus every ``FRAUDSTREAM_*`` variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}


def run_worker_to_exit(settings: Settings, timeout_s: float) -> tuple[int, str]:
    """Run ``fraudstream worker`` until it exits by itself; returns (code, stdout+stderr).

    A worker still running after ``timeout_s`` fails the test: it did not fail fast.
    """
    try:
        done = subprocess.run(
            worker_command()[0],
            env=worker_environment(settings, settings.metrics_port),
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace"
        )
        pytest.fail(f"the worker did not stop within {timeout_s} s:\n{output[-3000:]}")
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    return done.returncode, output


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
