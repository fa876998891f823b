"""``fraudstream worker``: the Faust application that scores transactions in real time.

One inbound path for both streams, one process::

    transactions ─┐                                                ┌─► scores, alerts
    <repartition> ┤  ScoringLoop (aiokafka, one consumer group)   ├─► scores.shadow
    labels ───────┘    validate → route → state → score → publish ├─► transactions.dlq
                          │    (labels, then transactions)         ├─► labels.dlq
                          │                  commit after acks     │
                          └─ wrong partition: re-key ─────────────┴─► <repartition>
    expired-labels timer (Faust) ─────────────────── same producer ──► labels.dlq

* **Transactions and labels** are consumed with aiokafka directly, by one consumer group,
  in a :class:`~stream_app.worker.loop.ScoringLoop` run as a service of the Faust
  application: Faust's per-event stream machinery costs more than the whole 20,000
  events/s budget on two cores (an empty Faust agent took 12,300 events/s on the bundled
  broker: about ten event-loop iterations an event). A batch's labels are applied in
  Redis before its transactions; every output goes through one producer; offsets are
  committed by hand, only once a batch is applied in Redis and every output of it is
  acknowledged; under ``exactly_once`` outputs and offsets commit in one Kafka
  transaction instead. A label applied twice counts once, so a redelivered label is
  harmless. After an assignment the loop applies the labels published so far before it
  scores, so a restart's backlog is scored with the labels an uninterrupted run would
  have seen (see :mod:`stream_app.worker.loop`).
* **Faust** is the application framework: lifecycle, services, signals, and the timer
  that dead-letters labels whose transaction never came. It consumes nothing and
  produces nothing: :class:`_TablelessApp` boots without Faust's Kafka consumer,
  producer, topic conductor or tables (``BootStrategy(enable_kafka=False)``), so there
  is no second consumer group to join at start-up.

Failures of Redis or Kafka are retried with capped exponential backoff, logged once per
attempt, counted, and reflected in ``fraudstream_ready``; nothing is committed past an
event whose effect and outputs are not in place, so a crash at any point re-processes
from the last commit and yields the same records (see :mod:`stream_app.scoring.pipeline`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import tempfile
from collections.abc import Awaitable
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.app.base import BootStrategy
from mode import Service
from prometheus_client import CollectorRegistry, start_http_server
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from stream_app.backoff import Backoff, FatalError
from stream_app.config import Settings, unknown_environment
from stream_app.errors import ConfigError
from stream_app.kafka import config as kafka_config
from stream_app.kafka import preflight as kafka_preflight
from stream_app.metrics import WorkerMetrics
from stream_app.models.registry import ModelOptions, ModelRegistry
from stream_app.records import ValidationLimits
from stream_app.scoring.pipeline import expired_labels
from stream_app.state.guard import start_guard
from stream_app.state.redis import RedisStateStore, StateClient
from stream_app.worker.loop import ScoringLoop
from stream_app.worker.runtime import WorkerRuntime, check_redis_mode, redis_client, state_store

log = logging.getLogger(__name__)


class ScoringService(Service):
    """Runs the :class:`ScoringLoop` for as long as the Faust application runs.

    On stop (SIGTERM) the loop stops polling and finishes its batch in flight, for at most
    ``shutdown_timeout_s``; past that it is cancelled, and whatever it had not committed is
    re-processed by the next owner of its partitions.
    """

    def __init__(self, runtime: WorkerRuntime, store: RedisStateStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtime = runtime
        self.store = store
        self.scoring: ScoringLoop | None = None
        self.clients_up = False  # the loop's clients are connected: its producer may be used
        self._run: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._watch_stop = asyncio.Event()
        self._guard: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        """Check the state marker (lost state is reported, and scoring goes on, flagged:
        :mod:`stream_app.state.guard`), connect, subscribe, and start the loop, the model
        watcher and the state marker's periodic check."""
        s = self.runtime.settings
        backoff = Backoff(self.runtime.metrics, s.retry_backoff_max_s)
        guard = await start_guard(s, self.store, self.runtime.metrics, backoff)
        self._guard = asyncio.create_task(
            guard.watch(s.state_check_interval_s, self._watch_stop), name="state-guard"
        )
        self.scoring = ScoringLoop(self.runtime, self.store)
        await self.scoring.start()
        self.clients_up = True
        self._run = asyncio.create_task(self._guarded(self.scoring.run()), name="scoring")
        interval = self.runtime.settings.model_poll_interval_s
        self._watch = asyncio.create_task(
            self.runtime.models.watch(interval, self._watch_stop), name="model-watch"
        )
        log.info(
            "scoring %s (labels from %s) with model %s",
            self.runtime.settings.topic_transactions,
            self.runtime.settings.topic_labels,
            self.runtime.models.champion.version,
        )

    async def _guarded(self, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except FatalError as exc:
            # Its message says what to fix; a traceback would only hide it, so none goes
            # with it into Faust's crash report.
            log.error("%s; stopping the worker", exc)
            exc.__traceback__ = None
            exc.__cause__ = None
            exc.__suppress_context__ = True
            await self.crash(exc)
        except BaseException as exc:
            # A bug or a broken model: stop the worker (non-zero exit) rather than go on
            # half-working; everything uncommitted is re-processed after the restart.
            log.exception("the scoring loop failed; stopping the worker")
            await self.crash(exc)

    async def on_stop(self) -> None:
        """Drain: finish the batch in flight, commit, leave the group."""
        self._watch_stop.set()
        self.clients_up = False
        if self.scoring is not None:
            await self.scoring.stop()
        if self._run is not None and not self._run.done():
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._run), self.runtime.settings.shutdown_timeout_s
                )
            except TimeoutError:
                log.warning("the batch in flight did not finish in time; it will be redone")
                self._run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._run
        for task in (self._watch, self._guard):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.scoring is not None:
            await self.scoring.close()
        self.runtime.metrics.ready.set(0)
        log.info("scoring stopped")


class _WithoutKafka(BootStrategy):
    """Faust's boot graph without its Kafka services.

    ``enable_kafka = False`` leaves out Faust's consumer (and with it its consumer group,
    leader assignor, reply consumer and topic conductor), its producer and its tables; the
    sensors, the agent manager (no agents), timers and services still start. Faust's
    ``producer_only`` mode would still start a producer, a second one beside the loop's.
    """

    enable_kafka = False


class _TablelessApp(faust.App):
    """A Faust app without Kafka clients or tables, so without a data directory.

    Faust creates ``<datadir>/v1/tables`` when it first starts; this app keeps nothing
    there, and every worker run (and every demo and test run) used to leave one such
    folder in ``/tmp``, SIGKILLed workers included. Not creating it leaves nothing.
    """

    BootStrategy = _WithoutKafka

    def _create_directories(self) -> None:
        return None


def build_app(runtime: WorkerRuntime) -> faust.App:
    """The Faust application: the scoring service and the expired-labels timer.

    Topics must exist (:func:`prepare`) before the application starts.
    """
    s = runtime.settings
    app = _TablelessApp(
        s.group_id,
        # Faust opens no Kafka connection (_WithoutKafka); its configuration still names
        # the cluster, so that what it prints describes this deployment.
        broker=[f"kafka://{server}" for server in s.bootstrap_servers],
        broker_credentials=kafka_config.faust_credentials(s),
        # Never a transactional producer of Faust's own (it has no producer anyway).
        processing_guarantee="at_least_once",
        web_enabled=False,
        autodiscover=False,
        # No tables: nothing is written there, and _TablelessApp does not create it
        # (Faust's default is ./<id>-data in the working directory).
        datadir=Path(tempfile.gettempdir()) / f"fraudstream-{s.group_id}",
        topic_allow_declare=False,
    )
    store = state_store(s, runtime.state_sequence_length, runtime.metrics)
    metrics = runtime.metrics
    services: list[ScoringService] = []  # the running service, once Faust has started it

    sweep_every_s = min(5.0, max(0.5, s.label_wait_s / 2))

    @app.timer(interval=sweep_every_s, name="expired_labels")  # type: ignore[untyped-decorator]
    async def dead_letter_expired_labels() -> None:
        """Dead-letter the labels whose transaction never came within the label wait.

        Each pending label is claimed for a minute, dead-lettered (with the scoring loop's
        producer), then dropped: a worker that dies in between leaves it to be handed out
        again (its dead letter may repeat, an identical copy). A failure here is logged
        and retried at the next tick."""
        scoring = services[0].scoring if services and services[0].clients_up else None
        if scoring is None:  # the service has not started yet, or is stopping
            return
        try:
            rejected, expired = await expired_labels(store, s.label_wait_s, metrics)
            if not rejected:
                return
            await scoring.publish_label_dead_letters(rejected)
            await store.drop_pending(expired)
        except (RedisError, KafkaError) as exc:
            if isinstance(exc, RedisError):
                metrics.redis_errors.inc()
            else:
                metrics.kafka_errors.labels("produce").inc()
            log.warning("dead-lettering expired labels failed (%s); retrying shortly", exc)
            return
        for r in rejected:
            metrics.dead_letters.labels(r.error.reason.value).inc()
        log.warning(
            "%d label(s) dead-lettered: no transaction with their customer, terminal and "
            "time was scored within %g s (FRAUDSTREAM_LABEL_WAIT_S)",
            len(rejected),
            s.label_wait_s,
        )

    class _Scoring(ScoringService):
        # Faust instantiates services itself (with loop and beacon); bind ours to runtime.
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(runtime, store, **kwargs)
            services.append(self)

    app.service(_Scoring)
    return app


async def prepare(settings: Settings, metrics: WorkerMetrics) -> dict[str, int]:
    """Wait for Kafka and Redis (retrying), check access, create the topics.

    An unreachable Kafka or Redis is retried (it may come later); what no retry can fix
    stops the worker here, before any client starts, with the setting or ACL to change
    (:mod:`stream_app.kafka.preflight`).

    Returns:
        The partition count of every topic the worker uses.

    Raises:
        ConfigError: a wrong credential, an untrusted certificate, a missing ACL, a broker
            without the idempotent or transactional producer the settings ask for, a
            topic missing with topic creation off, or a repartition topic that does not
            match the transactions topic.
    """
    backoff = Backoff(metrics, settings.retry_backoff_max_s)

    def kafka_error(_exc: BaseException) -> None:
        metrics.kafka_errors.labels("admin").inc()

    def redis_error(_exc: BaseException) -> None:
        metrics.redis_errors.inc()

    partitions = await backoff.run(
        lambda: kafka_preflight.check(settings),
        f"connecting to Kafka at {settings.kafka_bootstrap_servers} "
        "(FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS)",
        (KafkaError, OSError),
        kafka_error,
    )
    client = redis_client(settings)
    try:
        await backoff.run(
            functools.partial(ping_redis, client, settings),
            f"connecting to Redis at {settings.redis_display_url}",
            (RedisError, OSError),
            redis_error,
        )
    finally:
        await client.aclose()
    return partitions


async def ping_redis(client: StateClient, settings: Settings) -> None:
    """PING Redis; wrong credentials, an unverifiable certificate or a cluster mode other
    than ``FRAUDSTREAM_REDIS_CLUSTER`` says are configuration errors (no retry will fix
    them), an unreachable server is retried by the caller.

    Raises:
        ConfigError: Redis refused the password, its TLS certificate failed verification,
            or it is (not) a cluster node when the settings say otherwise.
    """
    where = settings.redis_display_url
    try:
        await check_redis_mode(client, settings)
        await client.ping()
    except (AuthenticationError, AuthorizationError) as exc:
        raise ConfigError(
            f"Redis at {where} refused the credentials ({type(exc).__name__}): check the "
            "password in FRAUDSTREAM_REDIS_URL or FRAUDSTREAM_REDIS_PASSWORD"
        ) from None
    except ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS")):
            raise ConfigError(
                f"Redis at {where} requires a password ({str(exc).split()[0]}): set it in "
                "FRAUDSTREAM_REDIS_URL or FRAUDSTREAM_REDIS_PASSWORD"
            ) from None
        raise
    except RedisConnectionError as exc:
        text = f"{exc} {exc.__cause__ or ''}"
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            raise ConfigError(
                f"the TLS certificate of Redis at {where} failed verification: set "
                "FRAUDSTREAM_REDIS_SSL_CA_FILE to the CA that signed it"
            ) from None
        raise


def start_metrics_server(settings: Settings, registry: CollectorRegistry) -> str | None:
    """Serve ``registry`` over HTTP; returns the URL, or None when the port is 0.

    Raises:
        ConfigError: the address cannot be bound.
    """
    if settings.metrics_port == 0:
        return None
    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc}): "
            "set FRAUDSTREAM_METRICS_PORT to a free port, or 0 to turn the endpoint off"
        ) from None
    return f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"


def configure_logging(level: str) -> None:
    """Plain one-line logs on stderr; Faust's own worker setup reuses the level."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # aiokafka logs every reconnection attempt at ERROR; our backoff already says it once.
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))


def run_worker(settings: Settings) -> int:
    """Run the worker until SIGTERM or SIGINT; returns the process exit code.

    Raises:
        ConfigError: a setting is wrong (the CLI turns it into exit code 2).
        ModelError: the champion model cannot serve.
    """
    configure_logging(settings.log_level)
    for name in unknown_environment():
        log.warning("ignoring unknown environment variable %s", name)
    metrics = WorkerMetrics(CollectorRegistry())
    options = ModelOptions(
        review_threshold=settings.review_threshold,
        decline_threshold=settings.decline_threshold,
        onnx_threads=settings.onnx_threads,
        max_sequence_length=settings.state_sequence_length,
    )
    models = ModelRegistry(settings.model_dir, settings.challenger_model_dir, options, metrics)
    models.load_initial()
    url = start_metrics_server(settings, metrics.registry)
    if url:
        log.info("metrics on %s", url)
    limits = ValidationLimits(
        max_payload_bytes=settings.max_payload_bytes,
        max_future=timedelta(seconds=settings.max_clock_skew_s),
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    partitions = loop.run_until_complete(prepare(settings, metrics))
    runtime = WorkerRuntime(settings, metrics, models, limits, partitions)
    # The state keeps this many transactions per customer from now on: a model reloaded
    # later that reads longer sequences is refused rather than fed short histories.
    models.options = dataclasses.replace(options, max_sequence_length=runtime.state_sequence_length)
    app = build_app(runtime)
    worker = faust.Worker(
        app, loop=loop, loglevel=settings.log_level, quiet=True, redirect_stdouts=False
    )
    try:
        worker.execute_from_commandline()
    except FatalError:
        return 1  # already logged with what to fix (see _guarded)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    return 0
