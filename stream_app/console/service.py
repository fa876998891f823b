"""Runs the console: the alerts consumer, the label and control publishers and the web
server together.

One process, one event loop: uvicorn serves the pages while the consumer and the publisher
run as tasks of the application's lifespan. If either task fails, the server stops and the
process exits non-zero (an orchestrator restarts it), rather than serving a queue that no
longer fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Final

import uvicorn
from prometheus_client import CollectorRegistry, start_http_server
from starlette.applications import Starlette

from stream_app.config import Settings
from stream_app.console.app import create_app
from stream_app.console.ingest import AlertIngest, HistoryIngest
from stream_app.console.metrics import ConsoleMetrics
from stream_app.console.outbox import control_publisher, label_publisher
from stream_app.console.settings import ConsoleSettings
from stream_app.console.store import CaseStore

log = logging.getLogger(__name__)

_STATS_INTERVAL_S: Final = 5.0
_PRUNE_INTERVAL_S: Final = 3600.0


async def _housekeeping(store: CaseStore, metrics: ConsoleMetrics, history_days: float) -> None:
    """Refresh the queue gauges every few seconds; forget old scores once an hour."""
    last_prune = 0.0
    while True:
        try:
            now = time.time()
            metrics.refresh(await asyncio.to_thread(store.stats), now)
            if history_days and now - last_prune > _PRUNE_INTERVAL_S:
                await asyncio.to_thread(store.prune_scores, now - history_days * 86_400)
                last_prune = now
        except Exception as exc:  # the store is down: the consumer reports it too
            log.warning("cannot read the queue's size (%s)", type(exc).__name__)
        await asyncio.sleep(_STATS_INTERVAL_S)


def build(
    settings: Settings, console: ConsoleSettings, registry: CollectorRegistry | None = None
) -> tuple[Starlette, CaseStore]:
    """The application with its background tasks wired into its lifespan, and its store."""
    store = CaseStore(console.database_url.get_secret_value())
    store.create_schema()
    metrics = ConsoleMetrics(registry if registry is not None else CollectorRegistry())
    metrics.sla.set(console.sla_s)
    ingest = AlertIngest(settings, store, metrics)
    history = HistoryIngest(settings, store, metrics) if console.history_days else None
    publisher = label_publisher(settings, store, metrics)
    controls = control_publisher(settings, store, metrics)
    failed: list[BaseException] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(ingest.run(), name="console-ingest"),
            asyncio.create_task(publisher.run(), name="console-labels"),
            asyncio.create_task(controls.run(), name="console-controls"),
        ]
        if history is not None:
            tasks.append(asyncio.create_task(history.run(), name="console-history"))
        housekeeping = asyncio.create_task(
            _housekeeping(store, metrics, console.history_days), name="console-housekeeping"
        )

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())  # type: ignore[arg-type]
                log.error("%s stopped: %r; stopping the console", task.get_name(), task.exception())
                server = getattr(app.state, "server", None)
                if server is not None:
                    server.should_exit = True

        for task in tasks:
            task.add_done_callback(done)
        try:
            yield
        finally:
            ingest.stop()
            publisher.stop()
            controls.stop()
            if history is not None:
                history.stop()
            housekeeping.cancel()
            await asyncio.gather(*tasks, housekeeping, return_exceptions=True)

    app = create_app(
        store,
        console,
        metrics,
        on_label=publisher.wake,
        on_control=controls.wake,
        lifespan=lifespan,
    )
    app.state.failed = failed
    app.state.ingest = ingest
    app.state.history = history
    return app, store


def run_console(settings: Settings, console: ConsoleSettings) -> int:
    """Serve until SIGINT or SIGTERM; returns the process's exit code."""
    registry = CollectorRegistry()
    app, store = build(settings, console, registry)
    if console.metrics_port:
        start_http_server(console.metrics_port, addr=console.host, registry=registry)
    if console.secret_key is None:
        log.warning(
            "FRAUDSTREAM_CONSOLE_SECRET_KEY is not set: a random key signs the sessions, so "
            "every login ends when the console restarts"
        )
    log.info(
        "console on http://%s:%d, case store %s",
        console.host,
        console.port,
        console.database_display_url,
    )
    config = uvicorn.Config(
        app, host=console.host, port=console.port, log_level="warning", access_log=False
    )
    server = _Server(config)
    app.state.server = server
    try:
        asyncio.run(_serve(server))
    finally:
        store.close()
    return 1 if app.state.failed else 0


class _Server(uvicorn.Server):
    """uvicorn's server, leaving SIGINT and SIGTERM to :func:`_serve`: uvicorn re-raises the
    signal after its graceful shutdown, so the process would end killed by the signal
    instead of with the console's exit code."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(server: uvicorn.Server) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, setattr, server, "should_exit", True)
    await server.serve()
