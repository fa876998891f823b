"""What a worker process is built from: settings, metrics, serving models, Redis client
and state store."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError

from stream_app.config import Settings
from stream_app.errors import ConfigError
from stream_app.metrics import WorkerMetrics
from stream_app.models.registry import ModelRegistry
from stream_app.records import ValidationLimits
from stream_app.scoring.reasons import STATE_RESET_REASON
from stream_app.state.redis import RedisStateStore, StateClient

log = logging.getLogger(__name__)


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


def redis_client(settings: Settings) -> StateClient:
    """A Redis client from the settings (TLS with rediss://, password, timeouts): of one
    Redis, or with ``redis_cluster`` of the Redis Cluster the URL's node belongs to."""
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
    url = settings.redis_url.get_secret_value()
    if settings.redis_cluster:
        # No retries inside the client: the store's calls are pipelines with per-node WAITs
        # that a blind re-send would misroute; the worker retries the whole batch instead
        # (every step is idempotent), after the store has re-read the cluster's layout.
        cluster: RedisCluster = RedisCluster.from_url(url, retry=Retry(NoBackoff(), 0), **options)
        return cluster
    client: aioredis.Redis = aioredis.Redis.from_url(url, **options)
    return client


def redis_wait_timeout_s(settings: Settings) -> float:
    """How long a Redis Cluster ``WAIT`` may block: half the socket timeout, at most 1 s
    (a batch whose writes are not replicated by then is retried)."""
    return min(1.0, settings.redis_timeout_s / 2)


def state_store(
    settings: Settings, sequence_length: int, metrics: WorkerMetrics | None = None
) -> RedisStateStore:
    """The worker's state store, on one Redis or a Redis Cluster as the settings say; a
    corrupt key it sets aside is logged and counted in ``metrics``."""

    def quarantined(key: str) -> None:
        log.error(
            "state key %r was corrupt (wrong type or size): set aside as %r; the events it "
            "concerns are scored from empty state (reason %r)",
            key,
            f"{key}:quarantined",
            STATE_RESET_REASON,
        )
        if metrics is not None:
            metrics.state_quarantined.inc()

    return RedisStateStore(
        redis_client(settings),
        prefix=settings.state_key_prefix,
        sequence_length=sequence_length,
        ttl_s=settings.state_ttl_s,
        cluster_shards=settings.redis_cluster_shards,
        wait_replicas=settings.redis_cluster_wait_replicas,
        wait_timeout_s=redis_wait_timeout_s(settings),
        label_wait_s=settings.label_wait_s,
        on_quarantine=quarantined,
    )


async def check_redis_mode(client: StateClient, settings: Settings) -> None:
    """Refuse a Redis whose mode the settings do not match, naming the setting to fix.

    A cluster node used as one Redis would answer every batch of several slots with
    ``CROSSSLOT`` or ``MOVED``, and a non-cluster Redis cannot be used as a cluster:
    retrying either would never succeed.

    Raises:
        ConfigError: the server's cluster mode differs from ``FRAUDSTREAM_REDIS_CLUSTER``,
            or no primary has the replicas ``FRAUDSTREAM_REDIS_CLUSTER_WAIT_REPLICAS`` asks.
    """
    where = settings.redis_display_url
    if isinstance(client, RedisCluster):
        try:
            await client.initialize()
        except RedisClusterException as exc:
            # redis-py reports every failure to reach the cluster as this one exception.
            text = str(exc)
            if "cluster mode is not enabled" in text.lower():
                raise ConfigError(
                    f"Redis at {where} is not a Redis Cluster node: set "
                    "FRAUDSTREAM_REDIS_CLUSTER=false, or point FRAUDSTREAM_REDIS_URL at a "
                    "cluster node"
                ) from None
            if any(m in text for m in ("NOAUTH", "WRONGPASS", "invalid username-password")):
                raise ConfigError(
                    f"the Redis Cluster at {where} refused the credentials: check the "
                    "password in FRAUDSTREAM_REDIS_URL or FRAUDSTREAM_REDIS_PASSWORD"
                ) from None
            if "certificate verify failed" in text.lower():
                raise ConfigError(
                    f"the TLS certificate of the Redis Cluster at {where} failed "
                    "verification: set FRAUDSTREAM_REDIS_SSL_CA_FILE to the CA that signed it"
                ) from None
            raise RedisConnectionError(f"Redis Cluster at {where}: {text}") from None
        wanted = settings.redis_cluster_wait_replicas
        # The replicas the cluster is built with (CLUSTER NODES), whether in sync or not:
        # one failing or still syncing is an outage that WAIT retries, not a setting.
        topology: dict[str, dict[str, Any]] = await client.cluster_nodes()
        replicas: dict[str, int] = {}
        for node in topology.values():
            if "slave" in str(node.get("flags", "")) and node.get("master_id", "-") != "-":
                master = str(node["master_id"])
                replicas[master] = replicas.get(master, 0) + 1
        most = max(replicas.values(), default=0)
        if most < wanted:
            # No primary has that many replicas: not an outage, a cluster built without
            # them; every batch would wait for them in vain.
            raise ConfigError(
                f"the Redis Cluster at {where} has at most {most} replica(s) per primary: "
                f"FRAUDSTREAM_REDIS_CLUSTER_WAIT_REPLICAS={wanted} can never be met (set it "
                f"to {most} or add replicas)"
            )
        return
    try:
        info = await client.info("cluster")
    except ResponseError:
        return  # INFO denied by an ACL or renamed: the mode cannot be told from here
    if int(info.get("cluster_enabled", 0)):
        raise ConfigError(
            f"Redis at {where} is a Redis Cluster node: set FRAUDSTREAM_REDIS_CLUSTER=true"
        )
