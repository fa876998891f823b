"""Retrying Redis and Kafka operations with capped exponential backoff."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from stream_app.metrics import WorkerMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_START_S: Final = 0.1  # the first pause, also after a failed poll
# When a retried operation has failed this long, one line says it is still waiting (a broker
# or Redis may come up later, so it keeps waiting); the line repeats every STILL_WAITING_EVERY_S.
STILL_WAITING_AFTER_S: Final = 30.0
STILL_WAITING_EVERY_S: Final = 300.0


def describe_error(exc: BaseException) -> str:
    """``Type: message`` once, even when the message already starts with the type's name."""
    name = type(exc).__name__
    text = str(exc)
    while text.startswith(f"{name}: "):
        text = text[len(name) + 2 :]
    return f"{name}: {text}" if text else name


class Backoff:
    """Retries an operation until it succeeds, pausing longer each time (capped).

    Args:
        metrics: ``fraudstream_ready`` drops to 0 while retrying, back to its value before
            the first failure on success.
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
        failed_since: float | None = None
        was_ready = 0.0
        notice_at = STILL_WAITING_AFTER_S
        while True:
            try:
                result = await operation()
            except errors as exc:
                on_error(exc)
                now = time.monotonic()
                if failed_since is None:
                    failed_since = now
                    was_ready = self.metrics.ready.value
                self.metrics.ready.set(0)
                waited = now - failed_since
                log.warning("%s failed (%s); retrying in %.1f s", what, describe_error(exc), delay)
                if waited >= notice_at:
                    log.warning(
                        "still waiting after %.0f s: %s keeps failing; retrying every %.0f s "
                        "at most until it succeeds (check the address and setting above)",
                        waited,
                        what,
                        self.max_s,
                    )
                    notice_at = waited + STILL_WAITING_EVERY_S
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_s)
            else:
                if failed_since is not None:
                    log.info(
                        "%s succeeded again after %.1f s", what, time.monotonic() - failed_since
                    )
                    # Back to what it was: a worker still starting is not ready yet.
                    self.metrics.ready.set(was_ready)
                return result
