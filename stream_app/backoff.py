"""Retrying Redis and Kafka operations with capped exponential backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from stream_app.metrics import WorkerMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_START_S: Final = 0.1  # the first pause, also after a failed poll


class Backoff:
    """Retries an operation until it succeeds, pausing longer each time (capped).

    Args:
        metrics: ``fraudstream_ready`` drops to 0 while retrying, back to 1 on success.
        max_s: The longest pause.
    """

    def __init__(self, metrics: WorkerMetrics, max_s: float) -> None:
        self.metrics = metrics
        self.max_s = max_s

    async def run(
        self,
        operation: Callable[[], Awaitable[T]],
        what: str,
        errors: tuple[type[BaseException], ...],
        on_error: Callable[[BaseException], None],
    ) -> T:
        """Await ``operation()`` until it stops raising ``errors``; other errors propagate."""
        delay = BACKOFF_START_S
        failed = False
        while True:
            try:
                result = await operation()
            except errors as exc:
                on_error(exc)
                self.metrics.ready.set(0)
                failed = True
                log.warning(
                    "%s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_s)
            else:
                if failed:
                    log.info("%s succeeded again", what)
                    self.metrics.ready.set(1)
                return result
