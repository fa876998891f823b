"""What a worker process is built from: settings, metrics, serving models, Redis client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from stream_app.config import Settings
from stream_app.metrics import WorkerMetrics
from stream_app.model_registry import ModelRegistry
from stream_app.records import ValidationLimits


@dataclass
class WorkerRuntime:
    """What the worker is built from: settings, metrics and the serving models."""

    settings: Settings
    metrics: WorkerMetrics
    models: ModelRegistry
    limits: ValidationLimits
    partitions: dict[str, int] = field(default_factory=dict)

    @property
    def state_sequence_length(self) -> int:
        """Transactions the state keeps per customer."""
        if self.settings.state_sequence_length is not None:
            return self.settings.state_sequence_length
        lengths = [self.models.champion.sequence_length]
        if self.models.challenger is not None:
            lengths.append(self.models.challenger.sequence_length)
        return max(lengths)


def redis_client(settings: Settings) -> aioredis.Redis:
    """A Redis client from the settings (TLS with rediss://, password, timeouts)."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 30,
    }
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_ssl_ca_file)
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.redis_url.get_secret_value(), **options
    )
    return client
