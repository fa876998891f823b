"""Kafka client configuration from the settings: security, producers, consumers, topics.

One place turns :class:`~stream_app.config.Settings` into keyword arguments for aiokafka
clients (the worker's scoring path, the replay tool) and into Faust's credentials (the
worker's Faust application), so PLAINTEXT, SSL (optionally mutual) and SASL_SSL with PLAIN
or SCRAM-SHA-256/512 are configured identically everywhere.

The bundled test broker (Tansu) supports neither TLS nor idempotent or transactional
producers: against it run ``FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL=PLAINTEXT`` (the default),
``FRAUDSTREAM_IDEMPOTENT_PRODUCER=false`` and ``at_least_once`` (the start-up checks of
:mod:`stream_app.kafka.preflight` say so). With Apache Kafka keep the idempotent producer on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidReplicationFactorError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)
from aiokafka.helpers import create_ssl_context

from stream_app.config import Settings
from stream_app.errors import ConfigError

log = logging.getLogger(__name__)

# Producer requests wait for every in-sync replica: a score acknowledged is a score kept.
PRODUCER_ACKS: Final = "all"
# How long one produce request may take before aiokafka fails it (and we retry the batch).
PRODUCER_REQUEST_TIMEOUT_MS: Final = 30_000
# Larger requests amortise per-request overhead at 20,000 events/s; a ScoreRecord is ~300 B.
PRODUCER_MAX_BATCH_BYTES: Final = 512 * 1024


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of SSL and SASL_SSL, verifying brokers; None for PLAINTEXT.

    Raises:
        ConfigError: a certificate or key file cannot be read or does not match.
    """
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    password = settings.kafka_ssl_key_password
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=str(settings.kafka_ssl_ca_file) if settings.kafka_ssl_ca_file else None,
            certfile=str(settings.kafka_ssl_cert_file) if settings.kafka_ssl_cert_file else None,
            keyfile=str(settings.kafka_ssl_key_file) if settings.kafka_ssl_key_file else None,
            password=password.get_secret_value() if password else None,
        )
        return context
    except (OSError, ssl.SSLError) as exc:
        # The message names files, never the key password.
        raise ConfigError(
            f"cannot build the Kafka TLS context from FRAUDSTREAM_KAFKA_SSL_*: {exc}"
        ) from None


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection and security arguments shared by every aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "client_id": f"{settings.group_id}-{settings.instance_id}",
    }
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol == "SASL_SSL":
        assert settings.kafka_sasl_password is not None  # checked by Settings
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return kwargs


def scoring_transactional_id(settings: Settings) -> str:
    """The transactional id of the scoring loop's producer under exactly-once.

    One per worker instance, stable across restarts: a restarted instance fences its own
    previous incarnation, and never another instance.
    """
    return f"{settings.group_id}-scoring-{settings.instance_id}"


# A dead letter is the original message with its dlq.* headers: room for those and for the
# record's own framing, on top of FRAUDSTREAM_MAX_PAYLOAD_BYTES.
DEAD_LETTER_OVERHEAD_BYTES: Final = 4096
_DEFAULT_MAX_REQUEST_BYTES: Final = 1 << 20  # aiokafka's


def producer_kwargs(settings: Settings, *, transactional_id: str | None = None) -> dict[str, Any]:
    """Arguments of an ``AIOKafkaProducer`` for the worker's outputs or the replay tool."""
    kwargs = client_kwargs(settings)
    kwargs.update(
        acks=PRODUCER_ACKS,
        enable_idempotence=settings.idempotent_producer,
        linger_ms=settings.producer_linger_ms,
        max_batch_size=PRODUCER_MAX_BATCH_BYTES,
        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        # The largest accepted message must fit as a dead letter.
        max_request_size=max(
            _DEFAULT_MAX_REQUEST_BYTES, settings.max_payload_bytes + DEAD_LETTER_OVERHEAD_BYTES
        ),
    )
    if transactional_id is not None:
        kwargs["transactional_id"] = transactional_id
    return kwargs


def consumer_kwargs(settings: Settings, group_id: str | None) -> dict[str, Any]:
    """Arguments of an ``AIOKafkaConsumer`` that commits by hand, after its outputs."""
    kwargs = client_kwargs(settings)
    kwargs.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Under exactly-once, aborted outputs of a zombie must stay invisible downstream;
        # our own inputs are read the same way so a replayed transaction is never half-seen.
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
        max_poll_records=settings.batch_size,
        session_timeout_ms=int(settings.consumer_session_timeout_s * 1000),
        rebalance_timeout_ms=int(settings.consumer_session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.consumer_session_timeout_s * 1000 / 3),
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
    )
    return kwargs


def faust_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` for the settings' security protocol (None: PLAINTEXT)."""
    import faust

    context = ssl_context(settings)
    if settings.kafka_security_protocol == "SASL_SSL":
        assert settings.kafka_sasl_password is not None
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


@dataclass(frozen=True)
class TopicSpec:
    """A topic the worker needs, and how it is created when missing."""

    name: str
    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)


def required_topics(settings: Settings, transactions_partitions: int) -> list[TopicSpec]:
    """Every topic the worker reads or writes.

    The repartition topic must have as many partitions as the transactions topic: an event
    re-keyed to partition ``p`` is then consumed by the member that owns ``p`` of both. The
    controls topic has one partition (one order for all changes) and keeps the latest
    record of each key (compacted), which is all a worker starting up needs.
    """
    others = [
        settings.topic_labels,
        settings.topic_scores,
        settings.topic_alerts,
        settings.topic_shadow_scores,
        settings.topic_dead_letters,
        settings.topic_label_dead_letters,
    ]
    return [
        TopicSpec(settings.topic_transactions, transactions_partitions),
        TopicSpec(settings.topic_repartition, transactions_partitions),
        *(TopicSpec(name, settings.topic_partitions) for name in others),
        TopicSpec(settings.topic_controls, 1, {"cleanup.policy": "compact"}),
    ]


async def topic_partitions(admin: AIOKafkaAdminClient, names: Iterable[str]) -> dict[str, int]:
    """Partition count of each existing topic among ``names``."""
    # Describe only topics that exist: a metadata request naming a missing topic makes
    # brokers with auto-creation on (Tansu, many Kafka defaults) create it with their own
    # partition count.
    wanted = set(names) & set(await admin.list_topics())
    if not wanted:
        return {}
    described = await admin.describe_topics(sorted(wanted))
    counts: dict[str, int] = {}
    for topic in described:
        if topic.get("error_code", 0) == 0 and topic["topic"] in wanted:
            counts[topic["topic"]] = len(topic["partitions"])
    return counts


def check_created(topic_errors: Iterable[dict[str, Any]], settings: Settings) -> None:
    """Turn the errors of a CreateTopics answer into what to fix; retriable ones propagate.

    A topic another replica created first is no error.

    Raises:
        ConfigError: the principal may not create the topics, or the broker refused the
            partition or replication settings.
        aiokafka.errors.KafkaError: a retriable error (the caller retries).
    """
    denied: list[str] = []
    for answer in topic_errors:
        error = for_code(answer["error_code"])
        if answer["error_code"] == 0 or error is TopicAlreadyExistsError:
            continue
        if error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
            denied.append(answer["topic"])
            continue
        detail = answer.get("error_message") or error.__name__
        if error is InvalidReplicationFactorError:
            raise ConfigError(
                f"cannot create topic {answer['topic']} ({detail}): set "
                "FRAUDSTREAM_TOPIC_REPLICATION_FACTOR to at most the number of brokers"
            )
        if error.retriable:
            raise error(detail)
        raise ConfigError(f"cannot create topic {answer['topic']}: {detail}")
    if denied:
        raise ConfigError(
            f"missing Kafka ACL: may not create topics {', '.join(sorted(denied))} (or "
            "describe them, if they exist): grant Create and Describe on them, or create them "
            "beforehand and set FRAUDSTREAM_CREATE_TOPICS=false"
        )


async def ensure_topics(settings: Settings) -> dict[str, int]:
    """Create the missing topics (when allowed) and check the partition contract.

    Returns:
        The partition count of every topic the worker uses.

    Raises:
        ConfigError: a topic is missing and ``create_topics`` is off, may not be created
            (ACLs), or the repartition topic's partition count differs from the
            transactions topic's.
        aiokafka.errors.KafkaError: the cluster is unreachable (the caller retries).
    """
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        names = [spec.name for spec in required_topics(settings, settings.topic_partitions)]
        existing = await topic_partitions(admin, names)
        source = existing.get(settings.topic_transactions, settings.topic_partitions)
        missing = [s for s in required_topics(settings, source) if s.name not in existing]
        if missing and not settings.create_topics:
            raise ConfigError(
                "missing topics "
                + ", ".join(s.name for s in missing)
                + ": create them or set FRAUDSTREAM_CREATE_TOPICS=true"
            )
        if missing:
            new = [
                NewTopic(
                    s.name,
                    s.partitions,
                    settings.topic_replication_factor,
                    topic_configs=dict(s.configs),
                )
                for s in missing
            ]
            response = await admin.create_topics(new)
            check_created(response.to_object()["topic_errors"], settings)
            log.info("created topics %s", ", ".join(s.name for s in missing))
            # Creation is asynchronous on some brokers: wait until every topic is described.
            for _ in range(100):
                existing = await topic_partitions(admin, names)
                if len(existing) == len(names):
                    break
                await asyncio.sleep(0.1)
        repartition = existing.get(settings.topic_repartition)
        if repartition is not None and repartition != existing.get(settings.topic_transactions):
            raise ConfigError(
                f"topic {settings.topic_repartition} has {repartition} partitions but "
                f"{settings.topic_transactions} has {existing.get(settings.topic_transactions)}: "
                "delete the repartition topic (it holds only in-flight events) and restart"
            )
        return existing
    finally:
        await admin.close()
