"""Start-up checks against Kafka: stop with what to fix instead of retrying what cannot heal.

aiokafka retries, or hides, most start-up failures: its bootstrap logs a refused password
or an unverifiable certificate and reports only "unable to bootstrap"; an ``ssl`` error is
an ``OSError`` like a refused connection; a broker that cannot initialise an idempotent
producer answers ``UnknownError``, which a retry loop would meet forever. :func:`check`
asks the broker the questions the worker's clients will ask, one at a time, and sorts the
answers::

    failure                                   outcome: the setting or ACL named
    ─────────────────────────────────────────────────────────────────────────────────────
    connection refused / reset / timed out    retried by the caller (Kafka may come later)
    TLS connection closed, client cert set    retried, hinting at FRAUDSTREAM_KAFKA_SSL_CERT_FILE
    TLS certificate fails verification        ConfigError  FRAUDSTREAM_KAFKA_SSL_CA_FILE
    SASL authentication refused               ConfigError  FRAUDSTREAM_KAFKA_SASL_USERNAME/PASSWORD
    SASL mechanism not enabled                ConfigError  FRAUDSTREAM_KAFKA_SASL_MECHANISM
    topic may not be created (missing)        ConfigError  the topics, FRAUDSTREAM_CREATE_TOPICS
    topic missing, FRAUDSTREAM_CREATE_TOPICS  ConfigError  each topic and the setting naming it
      false
    topic not described / no Read or Write    ConfigError  the topic, the operation, its setting
    consumer group not authorised             ConfigError  the group (FRAUDSTREAM_GROUP_ID)
    session timeout outside the brokers'      ConfigError  FRAUDSTREAM_CONSUMER_SESSION_TIMEOUT_S
      group.min/max.session.timeout.ms
    transactional id not authorised           ConfigError  the transactional id
    idempotent producer: cluster refused      ConfigError  IdempotentWrite / Write ACLs
    broker cannot initialise the producer     ConfigError  FRAUDSTREAM_IDEMPOTENT_PRODUCER,
      (no idempotence or transactions)                     FRAUDSTREAM_PROCESSING_GUARANTEE

Topic creation and the partition contract are :func:`stream_app.kafka.config.ensure_topics`;
``prepare()`` in :mod:`stream_app.worker.app` runs :func:`check` around it under its backoff.

Topic permissions come from the broker's own answer (Metadata v8,
``include_topic_authorized_operations``): nothing is written to a topic to find out.
The producer check starts the producer the scoring loop will start (same transactional id,
which belongs to this instance alone), so its ``InitProducerId`` is the real one. The
labels path (Faust) runs at least once in every mode and has no transactional producer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IncompatibleBrokerVersion,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String

from stream_app.config import ENV_PREFIX, Settings
from stream_app.errors import ConfigError
from stream_app.kafka import config as kafka_config

log = logging.getLogger(__name__)

# How long one check may wait on a broker that answers: a healthy one answers in
# milliseconds; past this the check counts as a connection problem and is retried.
CHECK_TIMEOUT_S: Final = 15.0

# ACL operation codes (org.apache.kafka.common.acl.AclOperation): bit i of an
# "authorized operations" field is set when operation i is allowed.
_READ: Final = 3
_WRITE: Final = 4
_OPERATION_NAMES: Final = {_READ: "Read", _WRITE: "Write"}
# What Kafka sends when it did not compute the field (an old broker, or not asked).
_NOT_PROVIDED: Final = -(2**31)


def _setting(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


# --- connection ------------------------------------------------------------------------


async def check_connection(settings: Settings) -> None:
    """Open one authenticated connection to a bootstrap server, as every client will.

    Raises:
        ConfigError: TLS verification or SASL authentication failed (no retry fixes it).
        KafkaConnectionError: no bootstrap server could be reached (retry later).
    """
    kwargs = kafka_config.client_kwargs(settings)
    failures: list[str] = []
    for server in settings.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            connection = await asyncio.wait_for(
                create_conn(
                    host,
                    int(port),
                    client_id=kwargs["client_id"],
                    request_timeout_ms=int(CHECK_TIMEOUT_S * 1000),
                    ssl_context=kwargs.get("ssl_context"),
                    security_protocol=kwargs["security_protocol"],
                    sasl_mechanism=kwargs.get("sasl_mechanism"),
                    sasl_plain_username=kwargs.get("sasl_plain_username"),
                    sasl_plain_password=kwargs.get("sasl_plain_password"),
                ),
                CHECK_TIMEOUT_S,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(
                f"the TLS certificate of the Kafka broker {server} failed verification "
                f"({exc.verify_message}): set {_setting('kafka_ssl_ca_file')} to the CA that "
                "signed it (and check that the certificate names the host in "
                f"{_setting('kafka_bootstrap_servers')})"
            ) from None
        except SaslAuthenticationFailed as exc:
            # The broker's message names the mechanism, never the password.
            raise ConfigError(
                f"the Kafka broker {server} refused the SASL credentials of user "
                f"{settings.kafka_sasl_username!r} ({exc}): check "
                f"{_setting('kafka_sasl_username')} and {_setting('kafka_sasl_password')}"
            ) from None
        except UnsupportedSaslMechanismError:
            raise ConfigError(
                f"the Kafka broker {server} does not offer SASL mechanism "
                f"{settings.kafka_sasl_mechanism}: set {_setting('kafka_sasl_mechanism')} to "
                "one its listener enables"
            ) from None
        except (OSError, KafkaError) as exc:
            failures.append(f"{server}: {type(exc).__name__}: {exc}")
            continue
        connection.close()
        return
    if settings.kafka_ssl_cert_file is not None and any("closed" in f for f in failures):
        # A broker that refuses a client certificate (TLS 1.3) just closes the connection,
        # which looks like any dropped connection: a hint, not a verdict, so still retried.
        failures.append(
            f"if this persists, the broker may not trust the client certificate "
            f"{_setting('kafka_ssl_cert_file')}={settings.kafka_ssl_cert_file}"
        )
    raise KafkaConnectionError("; ".join(failures))


# --- topics ----------------------------------------------------------------------------


# aiokafka is untyped (mypy sees its classes as Any): hence the ignores below.
class _MetadataResponseV8(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            Array(
                ("node_id", Int32),
                ("host", String("utf-8")),
                ("port", Int32),
                ("rack", String("utf-8")),
            ),
        ),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            Array(
                ("error_code", Int16),
                ("topic", String("utf-8")),
                ("is_internal", Boolean),
                (
                    "partitions",
                    Array(
                        ("error_code", Int16),
                        ("partition", Int32),
                        ("leader", Int32),
                        ("leader_epoch", Int32),
                        ("replicas", Array(Int32)),
                        ("isr", Array(Int32)),
                        ("offline_replicas", Array(Int32)),
                    ),
                ),
                ("topic_authorized_operations", Int32),
            ),
        ),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequestV8(RequestStruct):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponseV8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class _TopicOperationsRequest(Request[_MetadataRequestV8]):  # type: ignore[misc]
    """Metadata of named topics with the operations this principal may perform on each.

    aiokafka stops at Metadata v5, which cannot ask; v8 is the first version that can
    (Kafka 2.3+). A broker without v8 fails :meth:`prepare`, and the check is skipped.
    """

    API_KEY = 3

    def __init__(self, topics: Sequence[str]) -> None:
        self.topics = list(topics)

    def build(self, request_struct_class: type[_MetadataRequestV8]) -> _MetadataRequestV8:
        return request_struct_class(self.topics, False, False, True)


@dataclass(frozen=True)
class TopicNeed:
    """Operations the worker performs on one topic, and the setting that names it."""

    topic: str
    operations: tuple[int, ...]
    setting: str


def topic_needs(settings: Settings) -> list[TopicNeed]:
    """Every topic the worker uses, with what it does there (Read, Write)."""
    read, write = (_READ,), (_WRITE,)
    return [
        TopicNeed(settings.topic_transactions, read, _setting("topic_transactions")),
        TopicNeed(settings.topic_repartition, (_READ, _WRITE), _setting("group_id")),
        TopicNeed(settings.topic_labels, read, _setting("topic_labels")),
        TopicNeed(settings.topic_scores, write, _setting("topic_scores")),
        TopicNeed(settings.topic_alerts, write, _setting("topic_alerts")),
        TopicNeed(settings.topic_shadow_scores, write, _setting("topic_shadow_scores")),
        TopicNeed(settings.topic_dead_letters, write, _setting("topic_dead_letters")),
        TopicNeed(settings.topic_label_dead_letters, write, _setting("topic_label_dead_letters")),
        TopicNeed(settings.topic_controls, read, _setting("topic_controls")),
    ]


def _principal(settings: Settings) -> str:
    if settings.kafka_security_protocol == "SASL_SSL":
        return f"User:{settings.kafka_sasl_username}"
    if settings.kafka_ssl_cert_file is not None:
        return f"the principal of certificate {settings.kafka_ssl_cert_file}"
    return "this client"


def topic_problems(
    needs: Sequence[TopicNeed], answers: Mapping[str, tuple[int, int]], principal: str
) -> list[str]:
    """What is missing, from the broker's (error code, authorized operations) per topic.

    >>> need = TopicNeed("scores", (4,), "FRAUDSTREAM_TOPIC_SCORES")
    >>> topic_problems([need], {"scores": (0, 1 << 8 | 1 << 3)}, "User:worker")
    ['User:worker may not Write topic scores (FRAUDSTREAM_TOPIC_SCORES)']
    >>> topic_problems([need], {"scores": (0, 1 << 4)}, "User:worker")
    []
    """
    problems: list[str] = []
    for need in needs:
        error_code, allowed = answers.get(need.topic, (0, _NOT_PROVIDED))
        error = for_code(error_code)
        if error is TopicAuthorizationFailedError:
            problems.append(f"{principal} may not Describe topic {need.topic} ({need.setting})")
        elif allowed != _NOT_PROVIDED:
            for operation in need.operations:
                if not allowed & (1 << operation):
                    problems.append(
                        f"{principal} may not {_OPERATION_NAMES[operation]} topic "
                        f"{need.topic} ({need.setting})"
                    )
    return problems


async def check_topics(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """Ask which operations the broker allows on each topic; refuse to start without them.

    Raises:
        ConfigError: a topic the worker reads or writes is not authorised.
    """
    needs = topic_needs(settings)
    request = _TopicOperationsRequest([n.topic for n in needs])
    try:
        # The admin client has no public way to send a request of our own.
        response: Any = await admin._send_request(request)
    except (NotImplementedError, IncompatibleBrokerVersion):
        log.debug("the broker has no Metadata v8: topic permissions not checked")
        return
    answers = {
        t["topic"]: (t["error_code"], t["topic_authorized_operations"])
        for t in response.to_object()["topics"]
    }
    problems = topic_problems(needs, answers, _principal(settings))
    if problems:
        raise ConfigError(
            "missing Kafka ACLs: "
            + "; ".join(problems)
            + ": grant them (kafka-acls.sh --add --allow-principal ... --operation ... "
            "--topic ...), or point the named settings at topics the worker may use"
        )


async def missing_topics(admin: AIOKafkaAdminClient, topics: Sequence[str]) -> list[str]:
    """Which of ``topics`` the brokers do not know, asked without creating any.

    A plain metadata request naming a missing topic makes a broker with auto-creation on
    create it (with its own partition count), and the bundled broker acknowledges writes
    to a deleted topic and stores nothing: so the worker asks this before it starts, and
    before it commits a batch (:mod:`stream_app.worker.output_topics`).
    """
    try:
        response: Any = await admin._send_request(_TopicOperationsRequest(topics))
    except (NotImplementedError, IncompatibleBrokerVersion):  # no Metadata v8: list them
        known = set(await admin.list_topics())
        return [t for t in topics if t not in known]
    return [
        t["topic"]
        for t in response.to_object()["topics"]
        if for_code(t["error_code"]) is UnknownTopicOrPartitionError
    ]


async def check_topics_exist(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """With topic creation off, every topic must exist before the worker starts.

    Raises:
        ConfigError: naming each missing topic and the setting that names it.
    """
    if settings.create_topics:
        return
    needs = topic_needs(settings)
    missing = set(await missing_topics(admin, [n.topic for n in needs]))
    if missing:
        named = [f"{n.topic} ({n.setting})" for n in needs if n.topic in missing]
        raise ConfigError(
            "missing topics "
            + ", ".join(named)
            + f": create them, or set {_setting('create_topics')}=true to let the worker "
            "create them"
        )


# --- consumer groups -------------------------------------------------------------------


def _group_advice(group: str, principal: str) -> str:
    return (
        f"{principal} may not use consumer group {group}: grant Read on group {group} "
        f"(groups are named after {_setting('group_id')})"
    )


async def check_groups(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """The worker joins one group, ``group_id.scoring``, for transactions and labels.

    Raises:
        ConfigError: the group is not authorised (joining needs Read on it).
    """
    principal = _principal(settings)
    for group in (settings.scoring_group_id,):
        try:
            responses = await admin.describe_consumer_groups(
                [group], include_authorized_operations=True
            )
        except GroupAuthorizationFailedError:
            raise ConfigError(_group_advice(group, principal)) from None
        for response in responses:
            for described in response.to_object()["groups"]:
                if for_code(described["error_code"]) is GroupAuthorizationFailedError:
                    raise ConfigError(_group_advice(group, principal))
                allowed = described.get("authorized_operations", _NOT_PROVIDED)
                if allowed != _NOT_PROVIDED and not allowed & (1 << _READ):
                    raise ConfigError(_group_advice(group, principal))


# --- producer --------------------------------------------------------------------------


async def check_producer(settings: Settings) -> None:
    """Start the idempotent (or transactional) producer the scoring loop will start.

    Raises:
        ConfigError: the transactional id or idempotent writes are not authorised, or the
            broker cannot initialise such a producer at all.
        KafkaError: a retriable failure (coordinator not ready yet): the caller retries.
    """
    if not settings.idempotent_producer:
        return
    transactional_id = (
        kafka_config.scoring_transactional_id(settings) if settings.exactly_once else None
    )
    producer = AIOKafkaProducer(
        **kafka_config.producer_kwargs(settings, transactional_id=transactional_id)
    )
    kind = "a transactional" if transactional_id else "an idempotent"
    try:
        await asyncio.wait_for(producer.start(), CHECK_TIMEOUT_S)
    except TransactionalIdAuthorizationFailed:
        raise ConfigError(
            f"{_principal(settings)} may not use transactional id {transactional_id}: grant "
            f"Write on transactional ids with prefix {settings.group_id} (they are named after "
            f"{_setting('group_id')} and {_setting('instance_id')})"
        ) from None
    except ClusterAuthorizationFailedError:
        raise ConfigError(
            f"{_principal(settings)} may not initialise an idempotent producer: grant "
            "IdempotentWrite on the cluster (or Write on the worker's topics, Kafka 3.0+), or "
            f"set {_setting('idempotent_producer')}=false"
        ) from None
    except KafkaError as exc:
        if exc.retriable:
            raise
        raise ConfigError(
            f"the Kafka broker cannot initialise {kind} producer ({type(exc).__name__}): it "
            f"lacks idempotent or transactional producers (the bundled broker has neither). "
            f"Point {_setting('kafka_bootstrap_servers')} at Apache Kafka, or set "
            f"{_setting('idempotent_producer')}=false and "
            f"{_setting('processing_guarantee')}=at_least_once"
        ) from None
    finally:
        await producer.stop()


# --- all -------------------------------------------------------------------------------


_SESSION_RANGE: Final = ("group.min.session.timeout.ms", "group.max.session.timeout.ms")


async def check_session_timeout(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """The consumer session timeout must lie within the brokers' accepted range.

    Outside it, every JoinGroup fails with ``InvalidSessionTimeoutError``, which the group
    clients log and retry for ever. Brokers that do not let this principal describe their
    configuration (no DescribeConfigs ACL on the cluster) are not checked.

    Raises:
        ConfigError: FRAUDSTREAM_CONSUMER_SESSION_TIMEOUT_S is outside the range.
    """
    cluster = await admin.describe_cluster()
    brokers = cluster.get("brokers") or []
    if not brokers:
        return
    wanted: dict[str, None] = dict.fromkeys(_SESSION_RANGE)
    resource = ConfigResource(ConfigResourceType.BROKER, str(brokers[0]["node_id"]), wanted)
    try:
        responses = await admin.describe_configs([resource])
    except KafkaError as exc:
        log.debug("broker configuration not readable (%s): session timeout not checked", exc)
        return
    values: dict[str, float] = {}
    for response in responses:
        for item in response.to_object().get("resources", []):
            if item.get("error_code"):
                log.debug("broker configuration not readable: session timeout not checked")
                return
            for entry in item.get("config_entries", []):
                values[entry["config_names"]] = float(entry["config_value"]) / 1000
    low, high = (values.get(name) for name in _SESSION_RANGE)
    timeout = settings.consumer_session_timeout_s
    if low is not None and high is not None and not low <= timeout <= high:
        raise ConfigError(
            f"{_setting('consumer_session_timeout_s')}={timeout:g} is outside the range the "
            f"brokers accept ({_SESSION_RANGE[0]}={low * 1000:.0f}, {_SESSION_RANGE[1]}="
            f"{high * 1000:.0f}): set it between {low:g} and {high:g} seconds"
        )


async def check_dead_letter_room(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """The dead-letter topics must take the largest message the worker accepts.

    A message of up to FRAUDSTREAM_MAX_PAYLOAD_BYTES that fails validation is published as
    it came, plus headers; a topic whose ``max.message.bytes`` is smaller refuses it, and
    no retry changes that. Brokers that do not let this principal describe topic
    configurations are not checked (the worker then stops when it meets such a message).

    Raises:
        ConfigError: a dead-letter topic is too small for FRAUDSTREAM_MAX_PAYLOAD_BYTES.
    """
    topics = [settings.topic_dead_letters, settings.topic_label_dead_letters]
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
        for topic in topics
    ]
    try:
        responses = await admin.describe_configs(resources)
    except KafkaError as exc:
        log.debug("topic configuration not readable (%s): dead-letter room not checked", exc)
        return
    needed = settings.max_payload_bytes + kafka_config.DEAD_LETTER_OVERHEAD_BYTES
    for response in responses:
        for item in response.to_object().get("resources", []):
            if item.get("error_code"):
                continue
            for entry in item.get("config_entries", []):
                value = entry.get("config_value")
                if entry["config_names"] != "max.message.bytes" or value is None:
                    continue
                if int(value) < needed:
                    raise ConfigError(
                        f"topic {item['resource_name']} accepts messages of up to {value} "
                        f"bytes, but {_setting('max_payload_bytes')}="
                        f"{settings.max_payload_bytes} lets larger ones be dead-lettered "
                        f"there: set its max.message.bytes to at least {needed}, or lower "
                        f"{_setting('max_payload_bytes')} to at most "
                        f"{int(value) - kafka_config.DEAD_LETTER_OVERHEAD_BYTES}"
                    )


async def check(settings: Settings) -> dict[str, int]:
    """Every start-up check, and topic creation; returns the partition count of each topic.

    Raises:
        ConfigError: a setting or an ACL must change (see the module's table).
        KafkaError, OSError: Kafka is not reachable yet: the caller retries.
    """
    await check_connection(settings)
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        await check_topics_exist(admin, settings)
    finally:
        await admin.close()
    partitions = await kafka_config.ensure_topics(settings)
    admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(settings))
    await admin.start()
    try:
        await check_topics(admin, settings)
        await check_groups(admin, settings)
        await check_session_timeout(admin, settings)
        await check_dead_letter_room(admin, settings)
    finally:
        await admin.close()
    await check_producer(settings)
    return partitions
