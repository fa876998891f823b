"""Retrying Redis and Kafka operations with capped exponential backoff.

Only what a later try may change is retried: a Kafka error that no retry changes (a record
the brokers refuse as too large, an ACL taken away) stops the worker with a
:class:`FatalKafkaError`, and a Redis that refuses the worker's credentials or an ACL (a
password rotated while it runs) with a :class:`FatalRedisError`, each saying what to fix,
instead of retrying it for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from redis.exceptions import AuthenticationError, NoPermissionError

from stream_app.errors import FraudStreamError
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


# Kafka errors no retry changes, and what the operator must do about each.
FATAL_KAFKA_ERRORS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (
        MessageSizeTooLargeError,
        "the brokers refuse a record as too large: keep FRAUDSTREAM_MAX_PAYLOAD_BYTES a few "
        "KiB below the max.message.bytes of the dead-letter topics and the brokers' "
        "message.max.bytes",
    ),
    (
        TopicAuthorizationFailedError,
        "the worker may no longer use a topic: restore its principal's Read ACL on the input "
        "and controls topics and Write ACL on the output topics",
    ),
    (
        GroupAuthorizationFailedError,
        "restore Read on the consumer group FRAUDSTREAM_GROUP_ID.scoring for the worker's "
        "principal",
    ),
    (
        TransactionalIdAuthorizationFailed,
        "restore Write and Describe on the worker's transactional id (named after "
        "FRAUDSTREAM_GROUP_ID and FRAUDSTREAM_INSTANCE_ID)",
    ),
    (
        ClusterAuthorizationFailedError,
        "restore the cluster permission the brokers ask for (IdempotentWrite before Kafka 3.0)",
    ),
)


# Redis errors no retry changes while the worker runs (at start-up the same refusals stop
# it with exit code 2: stream_app.worker.app.ping_redis), and what the operator must do.
FATAL_REDIS_ERRORS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (
        AuthenticationError,
        "Redis refuses the worker's credentials (a password rotated or a user removed): set "
        "FRAUDSTREAM_REDIS_URL (or FRAUDSTREAM_REDIS_PASSWORD) to the current ones and "
        "restart the worker",
    ),
    (
        NoPermissionError,
        "the worker's Redis user may no longer run a command it needs: restore its ACL "
        "(the state scripts' EVALSHA, EVAL and SCRIPT LOAD, on the keys under "
        "FRAUDSTREAM_STATE_KEY_PREFIX)",
    ),
)


class FatalError(FraudStreamError):
    """An operation failed in a way no retry changes; the message says what to fix."""


class FatalKafkaError(FatalError):
    """A Kafka operation failed in a way no retry changes; the message says what to fix."""


class FatalRedisError(FatalError):
    """A Redis operation failed in a way no retry changes; the message says what to fix."""


def fatal_kafka_fix(exc: BaseException) -> str | None:
    """What to fix, if ``exc`` is a Kafka error no retry changes; None otherwise."""
    for kind, fix in FATAL_KAFKA_ERRORS:
        if isinstance(exc, kind):
            return fix
    return None


def fatal_kafka_error(what: str, exc: BaseException) -> FatalKafkaError | None:
    """The error that stops the worker, if ``exc`` is one no retry changes."""
    fix = fatal_kafka_fix(exc)
    if fix is None:
        return None
    return FatalKafkaError(f"{what} failed ({describe_error(exc)}), which no retry changes: {fix}")


def fatal_redis_fix(exc: BaseException) -> str | None:
    """What to fix, if ``exc`` is a Redis error no retry changes; None otherwise."""
    for kind, fix in FATAL_REDIS_ERRORS:
        if isinstance(exc, kind):
            return fix
    return None


def fatal_error(what: str, exc: BaseException) -> FatalError | None:
    """The error that stops the worker, if ``exc`` is a Kafka or Redis error no retry
    changes; None for one a later try may heal."""
    kafka = fatal_kafka_error(what, exc)
    if kafka is not None:
        return kafka
    fix = fatal_redis_fix(exc)
    if fix is None:
        return None
    return FatalRedisError(f"{what} failed ({describe_error(exc)}), which no retry changes: {fix}")


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
        """Await ``operation()`` until it stops raising ``errors``; other errors propagate.

        Raises:
            FatalError: the operation failed with a Kafka or Redis error no retry changes.
        """
        delay = BACKOFF_START_S
        failed_since: float | None = None
        was_ready = 0.0
        notice_at = STILL_WAITING_AFTER_S
        while True:
            try:
                result = await operation()
            except errors as exc:
                on_error(exc)
                fatal = fatal_error(what, exc)
                if fatal is not None:
                    raise fatal from exc
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
