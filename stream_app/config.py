"""The worker's settings: one frozen object read from the environment once, passed down.

Every setting is an environment variable ``FRAUDSTREAM_<NAME>`` (a few also accept a common
unprefixed name, e.g. ``KAFKA_BOOTSTRAP_SERVERS``). :func:`load_settings` turns any mistake
into a :class:`~stream_app.errors.ConfigError` that names the variable and says what to fix,
without ever echoing a secret; :func:`settings_table` renders the README's table from the
field definitions, so the documentation cannot drift from the code.

Secrets (passwords, the Redis URL, which may embed one) are :class:`pydantic.SecretStr`:
they print as ``**********`` and only :meth:`SecretStr.get_secret_value` reveals them.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream_app import features
from stream_app.errors import ConfigError
from stream_app.records import MAX_CLOCK_SKEW
from stream_app.state.redis_cluster import DEFAULT_SHARDS
from stream_app.state.store import DEFAULT_LABEL_WAIT_S

ENV_PREFIX: Final = "FRAUDSTREAM_"
# Environment names that belong to other tools (the test suite's Redis, the review console's
# own settings in stream_app/console/settings.py), not to the worker.
_FOREIGN_PREFIXES: Final = ("FRAUDSTREAM_TEST_", "FRAUDSTREAM_CONSOLE_")
_DAY_S: Final = 86_400
# A terminal's widest window reaches back this many days; state must outlive it, or a
# terminal quiet for a while would lose counters the model's features still read.
MIN_STATE_TTL_S: Final = (
    max(features.TERMINAL_WINDOWS_DAYS) + features.LABEL_DELAY_DAYS + 1
) * _DAY_S

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
ProcessingGuarantee = Literal["at_least_once", "exactly_once"]
OffsetResetPolicy = Literal["earliest", "latest", "fail"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
TopicName = Annotated[str, Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")]


def _env(name: str, *aliases: str) -> AliasChoices:
    """Accept ``FRAUDSTREAM_<NAME>`` first, then the given unprefixed aliases."""
    return AliasChoices(ENV_PREFIX + name.upper(), *aliases)


class Settings(BaseSettings):
    """Everything the worker, the replay tool and the demo can be told from outside."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        env_ignore_empty=True,
        populate_by_name=True,
        validate_default=True,
    )

    # Kafka
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        validation_alias=_env("kafka_bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS"),
        description="Comma-separated host:port list of Kafka brokers.",
    )
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL (TLS, optionally mutual) or SASL_SSL."
    )
    kafka_sasl_mechanism: SaslMechanism = Field(
        "PLAIN", description="With SASL_SSL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    kafka_sasl_username: str | None = Field(None, description="With SASL_SSL: the user name.")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="With SASL_SSL: the password (secret)."
    )
    kafka_ssl_ca_file: Path | None = Field(
        None, description="With SSL or SASL_SSL: CA bundle to verify brokers (PEM)."
    )
    kafka_ssl_cert_file: Path | None = Field(
        None, description="With SSL: client certificate for mutual TLS (PEM)."
    )
    kafka_ssl_key_file: Path | None = Field(
        None, description="With SSL: the client certificate's private key (PEM)."
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="Password of the private key, if encrypted (secret)."
    )
    group_id: TopicName = Field(
        "fraudstream",
        description="Faust application id and consumer group prefix; one per deployment.",
    )
    instance_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="Stable name of this worker replica (default the host name); names its "
        "transactional producer under exactly-once.",
    )
    idempotent_producer: bool = Field(
        True,
        description="Idempotent Kafka producer. Keep on with Apache Kafka; the bundled "
        "test broker does not support it (set false there).",
    )
    processing_guarantee: ProcessingGuarantee = Field(
        "at_least_once",
        description="at_least_once (duplicates on output after a crash, identical records) "
        "or exactly_once (Kafka transactions; needs a broker that supports them).",
    )
    consumer_session_timeout_s: float = Field(
        10.0,
        ge=3,
        le=300,
        description="A worker silent this long leaves the consumer group and its partitions "
        "move (also the rebalance timeout) (s).",
    )
    producer_linger_ms: int = Field(
        0,
        ge=0,
        le=1000,
        description="How long the producer waits to fill a request (ms); the worker sends "
        "whole micro-batches already, so waiting only adds latency.",
    )
    consumer_fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=30_000,
        description="Longest the broker may hold a fetch while it has no new records (ms). "
        "Apache Kafka answers as soon as records arrive, so this only paces idle fetches; "
        "a broker that holds every fetch for the full wait (the bundled one) adds up to this "
        "much latency per hop, and below ~20 ms its CPU grows with every fetch.",
    )
    # Topics
    topic_transactions: TopicName = Field("transactions", description="Inbound transactions.")
    topic_labels: TopicName = Field("labels", description="Inbound fraud labels.")
    topic_scores: TopicName = Field("scores", description="A ScoreRecord per transaction.")
    topic_alerts: TopicName = Field("alerts", description="ScoreRecords to review or decline.")
    topic_shadow_scores: TopicName = Field(
        "scores.shadow", description="The challenger model's ScoreRecords."
    )
    topic_dead_letters: TopicName = Field(
        "transactions.dlq", description="Invalid transactions, original bytes, reason headers."
    )
    topic_label_dead_letters: TopicName = Field(
        "labels.dlq", description="Invalid labels, original bytes, reason headers."
    )
    topic_controls: TopicName = Field(
        "controls",
        description="Operators' block and allow lists and threshold overrides, from the "
        "review console; one partition, compacted; every worker reads all of it.",
    )
    topic_partitions: int = Field(
        4, ge=1, le=10_000, description="Partitions of the topics the worker creates."
    )
    topic_replication_factor: int = Field(
        1, ge=1, le=10, description="Replication factor of the topics the worker creates."
    )
    create_topics: bool = Field(True, description="Create missing topics at start-up.")
    # Micro-batches
    batch_size: int = Field(1000, ge=1, le=100_000, description="Most events per micro-batch.")
    batch_max_wait_s: float = Field(
        0.005,
        gt=0,
        le=10,
        description="How long a poll waits for a first event. A batch holds whatever has "
        "arrived, up to batch_size: events never wait for a batch to fill.",
    )
    offset_reset_policy: OffsetResetPolicy = Field(
        "earliest",
        description="What to do when the scoring group's position on an input partition is "
        "out of range (its topic deleted and re-created, or truncated): earliest re-reads "
        "it from its start, latest skips to its end, fail stops the worker. Always logged "
        "at ERROR and counted (fraudstream_offset_resets_total).",
    )
    max_payload_bytes: int = Field(
        16 * 1024, ge=64, le=1 << 20, description="Larger messages are dead-lettered."
    )
    max_clock_skew_s: float = Field(
        MAX_CLOCK_SKEW.total_seconds(),
        ge=0,
        description="How far past the worker's clock an event time may lie (s); further "
        "ahead is dead-lettered (timestamp_out_of_range). Minutes cover synchronised clocks; "
        "an event hours ahead is a wrong clock or time zone.",
    )
    # Redis state
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        validation_alias=_env("redis_url", "REDIS_URL"),
        description="redis:// or rediss:// (TLS) URL of the state store (secret: it may "
        "hold a password).",
    )
    redis_password: SecretStr | None = Field(
        None, description="Redis password, when not in the URL (secret)."
    )
    redis_ssl_ca_file: Path | None = Field(
        None, description="With rediss://: CA bundle to verify the server (PEM)."
    )
    redis_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Socket timeout of a Redis call (s)."
    )
    redis_cluster: bool = Field(
        False,
        description="The Redis URL names a node of a Redis Cluster: state keys carry hash "
        "tags and each micro-batch is split into calls that each touch one slot.",
    )
    redis_cluster_shards: int = Field(
        DEFAULT_SHARDS,
        ge=1,
        le=1024,
        description="With a Redis Cluster: hash tags (shards) for customer keys and as many "
        "for terminal keys, spread evenly over the slots: at least the number of primaries, "
        "2-3 per primary (each shard a batch touches costs a call). It names the keys: "
        "changing it starts the state afresh.",
    )
    redis_cluster_wait_replicas: int = Field(
        1,
        ge=0,
        le=16,
        description="With a Redis Cluster: replicas that must confirm a micro-batch's state "
        "writes (WAIT) before it is scored and committed, so a failover loses none; a batch "
        "not confirmed within half the Redis timeout (at most 1 s) is retried. 0: no wait.",
    )
    state_key_prefix: str = Field(
        "fs",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Prefix of every Redis key.",
    )
    state_ttl_s: float = Field(
        45 * _DAY_S,
        ge=MIN_STATE_TTL_S,
        description="Lifetime of a customer's or terminal's state after its last write (s); "
        "at least 38 days, the terminal windows' reach.",
    )
    label_wait_s: float = Field(
        DEFAULT_LABEL_WAIT_S,
        gt=0,
        le=30 * _DAY_S,
        description="How long a label for a transaction the worker has not scored yet "
        "waits for it (s); then it is dead-lettered (label_unknown_transaction).",
    )
    state_check_interval_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often the worker checks the state marker in Redis (s): a marker "
        "gone, of another epoch or gone back means Redis lost the state "
        "(fraudstream_state_lost).",
    )
    state_sequence_length: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Transactions kept per customer; default the longest sequence of the "
        "models loaded at start-up. A later model needing more is refused.",
    )
    # Models
    model_dir: Path = Field(
        Path("onnx_models/default"),
        description="Champion model: a model directory, a symlink to one, or a text file "
        "holding the path of one. Watched: a change is loaded without a restart.",
    )
    challenger_model_dir: Path | None = Field(
        None, description="Challenger scored in shadow (same forms as model_dir)."
    )
    model_poll_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often the model directories are checked (s)."
    )
    review_threshold: float | None = Field(
        None, ge=0, le=1, description="Overrides the champion card's review threshold."
    )
    decline_threshold: float | None = Field(
        None, ge=0, le=1, description="Overrides the champion card's decline threshold."
    )
    max_reasons: int = Field(3, ge=1, le=5, description="Reasons given per alert.")
    onnx_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per call.")
    # Operations
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address of the Prometheus endpoint; 0.0.0.0 to be scraped from "
        "outside a container.",
    )
    metrics_port: int = Field(
        9300, ge=0, le=65535, description="Port of the Prometheus endpoint; 0 turns it off."
    )
    psi_window: int = Field(
        10_000,
        ge=100,
        le=10_000_000,
        description="Live scores the PSI drift gauge compares with the card's reference.",
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    retry_backoff_max_s: float = Field(
        10.0, gt=0, le=600, description="Longest pause between retries of Redis or Kafka (s)."
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, le=600, description="How long SIGTERM waits for the batch in flight (s)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def bootstrap_servers(self) -> list[str]:
        """The brokers as a list of ``host:port``."""
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]

    @property
    def topic_repartition(self) -> str:
        """Internal topic re-keying events that arrived on the wrong partition."""
        return f"{self.group_id}.{self.topic_transactions}.repartition"

    @property
    def scoring_group_id(self) -> str:
        """The worker's one consumer group: transactions, repartition and labels topics
        (``group_id`` is the Faust app's id and the prefix of the worker's names)."""
        return f"{self.group_id}.scoring"

    @property
    def redis_display_url(self) -> str:
        """The Redis URL with any password replaced, fit for logs."""
        return redact_url(self.redis_url.get_secret_value())

    @property
    def exactly_once(self) -> bool:
        """Whether outputs and offsets are committed in Kafka transactions."""
        return self.processing_guarantee == "exactly_once"


# A query parameter holding a secret: redis-py reads ``?password=`` as the password.
_SECRET_QUERY: Final = re.compile(r"(?i)((?:^|[?&;])[^=&;#]*pass[^=&;#]*=)[^&;#]*")


def redact_url(url: str) -> str:
    """A URL with its password masked, wherever it is and however badly it is written.

    The user information is everything between ``://`` and the *last* ``@``, so a
    password holding an unencoded ``/``, ``?``, ``#`` or ``@`` is masked whole (a URL
    parser would read part of it as the path, query or fragment); any query parameter
    whose name holds ``pass`` is masked too.

    >>> redact_url("rediss://app:s3cret@cache:6380/0")
    'rediss://app:***@cache:6380/0'
    >>> redact_url("redis://:pa/ss#x@cache:6379/0?password=s3cret&db=1")
    'redis://:***@cache:6379/0?password=***&db=1'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SECRET_QUERY.sub(r"\1***", url)
    if "@" in rest:
        user_info, _, rest = rest.rpartition("@")
        user = user_info.partition(":")[0]
        rest = f"{user}:***@{rest}" if ":" in user_info else f"***@{rest}"
    return f"{scheme}://" + _SECRET_QUERY.sub(r"\1***", rest)


def redis_url_problem(url: str) -> str | None:
    """What makes a Redis URL unreadable, phrased without any part of it; None if fine.

    A password with an unencoded ``/``, ``?`` or ``#`` ends the URL's authority early: the
    rest of the password would be read as a port (a crash that echoed the password's first
    characters) or the server silently taken as ``localhost``.
    """
    _, sep, rest = url.partition("://")
    if not sep:
        return None
    authority_end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    if "@" in rest[authority_end:]:
        return (
            f"{ENV_PREFIX}REDIS_URL: the user name or password holds a '/', '?' or '#' that "
            "is not percent-encoded: write / as %2F, ? as %3F, # as %23, @ as %40 and % as "
            f"%25, or set the password apart in {ENV_PREFIX}REDIS_PASSWORD"
        )
    try:
        urlsplit(url).port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return (
            f"{ENV_PREFIX}REDIS_URL: the port is not a number (a password holding ':' "
            "needs no encoding, but one holding '/', '?', '#' does)"
        )
    return None


def _cross_field_problems(s: Settings) -> list[str]:
    """What is wrong between settings (each alone is valid), phrased as what to set."""
    p = ENV_PREFIX
    problems: list[str] = []
    for server in s.bootstrap_servers or [""]:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            problems.append(
                f"{p}KAFKA_BOOTSTRAP_SERVERS: {server!r} is not host:port (e.g. kafka-1:9092)"
            )
    if s.kafka_security_protocol == "SASL_SSL" and not (
        s.kafka_sasl_username and s.kafka_sasl_password
    ):
        problems.append(
            f"SASL_SSL needs {p}KAFKA_SASL_USERNAME and {p}KAFKA_SASL_PASSWORD to be set"
        )
    if s.kafka_security_protocol == "PLAINTEXT":
        tls_set = [
            name
            for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file")
            if getattr(s, name) is not None
        ]
        if tls_set:
            problems.append(
                f"{p}{tls_set[0].upper()} is set but {p}KAFKA_SECURITY_PROTOCOL is PLAINTEXT: "
                "set it to SSL or SASL_SSL"
            )
    if (s.kafka_ssl_cert_file is None) != (s.kafka_ssl_key_file is None):
        problems.append(f"set both {p}KAFKA_SSL_CERT_FILE and {p}KAFKA_SSL_KEY_FILE, or neither")
    for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
        path: Path | None = getattr(s, name)
        if path is not None and not path.is_file():
            problems.append(f"{p}{name.upper()}: {path} is not a readable file")
    if s.exactly_once and not s.idempotent_producer:
        problems.append(f"{p}PROCESSING_GUARANTEE=exactly_once needs {p}IDEMPOTENT_PRODUCER=true")
    redis_url = s.redis_url.get_secret_value()
    url_problem = redis_url_problem(redis_url)
    if url_problem is not None:
        problems.append(url_problem)
    scheme = urlsplit(redis_url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        problems.append(
            f"{p}REDIS_URL must start with redis://, rediss:// (TLS) or unix://, "
            f"got {redact_url(redis_url)!r}"
        )
    if s.redis_cluster and scheme == "unix":
        problems.append(
            f"{p}REDIS_CLUSTER=true needs a redis:// or rediss:// URL of a cluster node, "
            "not a unix socket"
        )
    if s.redis_ssl_ca_file is not None:
        if scheme != "rediss":
            problems.append(f"{p}REDIS_SSL_CA_FILE is set: use a rediss:// URL for TLS")
        if not s.redis_ssl_ca_file.is_file():
            problems.append(f"{p}REDIS_SSL_CA_FILE: {s.redis_ssl_ca_file} is not a readable file")
    review, decline = s.review_threshold, s.decline_threshold
    if review is not None and decline is not None and review > decline:
        problems.append(
            f"{p}REVIEW_THRESHOLD ({review}) must not exceed {p}DECLINE_THRESHOLD ({decline})"
        )
    if s.challenger_model_dir is not None and s.challenger_model_dir == s.model_dir:
        problems.append(f"{p}CHALLENGER_MODEL_DIR is the champion's {p}MODEL_DIR")
    outputs = [
        s.topic_scores,
        s.topic_alerts,
        s.topic_shadow_scores,
        s.topic_dead_letters,
        s.topic_label_dead_letters,
    ]
    inputs = {s.topic_transactions, s.topic_labels, s.topic_controls}
    if len(set(outputs)) != len(outputs) or inputs & set(outputs) or len(inputs) != 3:
        problems.append(f"the {p}TOPIC_* settings must name distinct topics")
    return problems


def env_name(field: str) -> str:
    """The main environment variable of a field, e.g. ``FRAUDSTREAM_BATCH_SIZE``."""
    return ENV_PREFIX + field.upper()


def _is_secret(field: str) -> bool:
    annotation = Settings.model_fields[field].annotation
    return annotation is SecretStr or annotation == (SecretStr | None)


def _field_of(loc: tuple[int | str, ...]) -> str | None:
    """The field a pydantic error location names (its alias or its name), if any."""
    if not loc:
        return None
    first = str(loc[0])
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else []
        if first == name or first in choices or first.upper() == env_name(name):
            return name
    return None


def _describe(exc: ValidationError) -> str:
    """One line per problem, naming the variable, never showing a secret's value."""
    lines = []
    for error in exc.errors(include_url=False):
        field = _field_of(error["loc"])
        if field is None:  # a cross-field check: its message already names the variables
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        given = "" if _is_secret(field) else f" (got {error.get('input')!r})"
        lines.append(f"{env_name(field)}: {error['msg']}{given}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment (``overrides`` win); the one place that does.

    Raises:
        ConfigError: with every problem found, each naming its environment variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """``FRAUDSTREAM_*`` variables that are no setting (likely typos), with a suggestion."""
    environ = os.environ if environ is None else environ
    known = {env_name(name) for name in Settings.model_fields}
    unknown = []
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if upper.startswith(_FOREIGN_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, known, n=1)
        unknown.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return unknown


def settings_environment(settings: Settings) -> dict[str, str]:
    """The settings as ``FRAUDSTREAM_*`` variables (secrets revealed): for a child process.

    Only fields set explicitly are written, so the child keeps its own defaults otherwise.
    """
    env: dict[str, str] = {}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[env_name(name)] = str(value)
    return env


def _default_text(name: str) -> str:
    info = Settings.model_fields[name]
    if info.default_factory is not None:
        return "host name" if name == "instance_id" else "computed"
    default = info.default
    if default is None:
        return "unset"
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def settings_table() -> str:
    """The Markdown table of every setting: variable, default, description.

    The README embeds this table and a test compares the two, so the documentation of a
    setting is its ``description`` here.
    """
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        extra = [c for c in alias.choices[1:]] if isinstance(alias, AliasChoices) else []
        variable = f"`{env_name(name)}`" + "".join(f" (or `{a}`)" for a in extra)
        description = (info.description or "").replace("|", "\\|")
        rows.append(f"| {variable} | `{_default_text(name)}` | {description} |")
    return "\n".join(rows) + "\n"


SECRET_MASK: Final = "**********"


def effective_settings() -> list[tuple[str, str, str]]:
    """What the worker would run with: ``(variable, value, source)`` for every setting.

    ``source`` is ``default`` or the environment variable that set it (``REDIS_URL`` or
    ``FRAUDSTREAM_REDIS_URL``, say). Secrets show as :data:`SECRET_MASK` and the Redis URL
    with its password replaced. :func:`settings_table` is the reference (defaults and
    descriptions) the README embeds; this is the view of one environment.

    Raises:
        ConfigError: a value is invalid; the message names each variable to fix.
    """
    settings = load_settings()  # reads os.environ, as the worker does
    upper = {key.upper(): key for key, value in os.environ.items() if value != ""}
    rows = []
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = [env_name(name)]
        if isinstance(alias, AliasChoices):
            names += [str(c).upper() for c in alias.choices if str(c).upper() not in names]
        set_by = next((upper[n] for n in names if n in upper), None)
        value = getattr(settings, name)
        if name == "redis_url":
            text = settings.redis_display_url
        elif value is None:
            text = "unset"
        elif isinstance(value, SecretStr):
            text = SECRET_MASK
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        source = set_by if set_by is not None and name in settings.model_fields_set else "default"
        rows.append((env_name(name), text, source))
    return rows
