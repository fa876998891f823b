"""Security against the real broker: SASL_SSL (SCRAM-SHA-512), mutual TLS and ACLs.

One Apache Kafka for the module, with certificates made here (a CA; the broker's
certificate for IP 127.0.0.1; a client certificate CN=worker, its key under a password)
and the KRaft ``StandardAuthorizer``: the worker's principal ``User:worker`` (the SCRAM
user, and the mapped CN of the client certificate) may do nothing until a test grants it,
through the PLAINTEXT listener (a super user), exactly what the worker needs: its topics,
its consumer groups and its transactional ids, by the test's name prefix.

* The real worker, with the settings ``docker-compose.yml`` deploys (exactly-once,
  idempotent producer), scores a small replay with labels over SASL_SSL and over mutual TLS.
* What no retry can fix stops it at start-up within seconds (bound:
  :data:`START_UP_BOUND_S`), exit code 2, with a message naming the setting or ACL to
  change: a wrong SCRAM password, an untrusted CA, each missing ACL, and a broker without
  idempotent or transactional producers (the bundled broker). An unreachable broker is
  retried, and says where it is looking and which setting says so.
* No secret (SASL password, key password) in the worker's log, even at DEBUG, nor on its
  ``/metrics``.

Apache Kafka only, not parametrised over brokers: the bundled broker has no TLS, SASL or
ACLs. It appears once, as the broker without the required features.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stream_app.config import Settings
from tests.kafka_fixtures import Broker, Dataset, delete_state, new_settings
from tests.resilience_helpers import (
    Message,
    account,
    publish,
    read_records,
    run_worker_to_exit,
    score_records,
    transaction_ids,
)
from training.ops.replay import replay_messages
from training.ops.services.apache_kafka import ApacheKafka, TlsFiles
from training.ops.services.net import free_port
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience]

# Distinctive values, so a search for them cannot match anything else.
SASL_PASSWORD = "k4fka-scram-pw-61c0d2"
WRONG_PASSWORD = "wr0ng-scram-pw-0a9f13"
KEY_PASSWORD = "cl1ent-key-pw-3e77b5"
SECRETS = (SASL_PASSWORD, WRONG_PASSWORD, KEY_PASSWORD)
WORKER = "worker"  # the SCRAM user and the client certificate's CN: one principal
PRINCIPAL = f"User:{WORKER}"
# A worker that cannot start must say so within this; measured: 2-4 s on this machine.
START_UP_BOUND_S = 30.0
REPLAY_TRANSACTIONS = 300


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files made for the module."""

    ca: Path
    broker_cert: Path
    broker_key: Path
    client_cert: Path  # CN=worker, signed by ``ca``
    client_key: Path  # encrypted under KEY_PASSWORD
    other_ca: Path  # a CA that signed nothing the broker serves
    stranger_cert: Path  # CN=worker, signed by ``other_ca``: the broker refuses it
    stranger_key: Path


def _issue(
    directory: Path,
    name: str,
    common_name: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    *,
    ip_san: bool = False,
    key_password: str | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate (self-signed when ``issuer`` is None: a CA) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if ip_san:
        names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(key_password.encode())
        if key_password
        else serialization.NoEncryption()
    )
    (directory / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return key, certificate


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA, the broker's certificate (IP:127.0.0.1), the worker's (CN=worker), another CA."""
    d = tmp_path_factory.mktemp("kafka-tls")
    ca = _issue(d, "ca", "fraudstream test kafka ca")
    _issue(d, "broker", "kafka-broker", ca, ip_san=True)
    _issue(d, "client", WORKER, ca, key_password=KEY_PASSWORD)
    other = _issue(d, "other-ca", "a ca nobody trusts")
    _issue(d, "stranger", WORKER, other)
    return Certificates(
        d / "ca.crt", d / "broker.crt", d / "broker.key", d / "client.crt", d / "client.key",
        d / "other-ca.crt", d / "stranger.crt", d / "stranger.key",
    )  # fmt: skip


# --- the broker and ACLs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_kafka(certificates: Certificates) -> Iterator[ApacheKafka]:
    """Apache Kafka with SASL_SSL and mutual-TLS listeners and ACLs on, for the module."""
    kafka = ApacheKafka(
        tls=TlsFiles(certificates.ca, certificates.broker_cert, certificates.broker_key),
        scram_users={WORKER: SASL_PASSWORD},
        acls=True,
    )
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


def _admin(kafka: ApacheKafka) -> AdminClient:
    """An admin client on the PLAINTEXT listener, whose principal is a super user."""
    return AdminClient({"bootstrap.servers": kafka.bootstrap_servers})


def _wait(futures: dict[Any, Any]) -> None:
    for future in futures.values():
        future.result(timeout=30)


def grant(
    kafka: ApacheKafka,
    prefix: str,
    *,
    topics: tuple[str, ...] = ("Read", "Write", "Describe", "Create"),
    topic_prefix: str = "{p}",
    groups: bool = True,
    transactional_ids: bool = True,
) -> None:
    """Allow ``User:worker`` what the worker needs on names starting with ``prefix``.

    Topics (``topics``: the operations; ``topic_prefix`` formats ``prefix`` as ``p``),
    consumer groups (Read) and transactional ids (Write, Describe). No cluster ACL: since
    Kafka 3.0, Write on a topic allows an idempotent producer.
    """
    operation = {
        "Read": AclOperation.READ,
        "Write": AclOperation.WRITE,
        "Describe": AclOperation.DESCRIBE,
        "Create": AclOperation.CREATE,
    }
    wanted = [(ResourceType.TOPIC, operation[name]) for name in topics]
    if groups:
        wanted.append((ResourceType.GROUP, AclOperation.READ))
    if transactional_ids:
        wanted += [
            (ResourceType.TRANSACTIONAL_ID, AclOperation.WRITE),
            (ResourceType.TRANSACTIONAL_ID, AclOperation.DESCRIBE),
        ]
    names = {ResourceType.TOPIC: topic_prefix.format(p=prefix)}
    bindings = [
        AclBinding(
            kind,
            names.get(kind, prefix),
            ResourcePatternType.PREFIXED,
            PRINCIPAL,
            "*",
            op,
            AclPermissionType.ALLOW,
        )
        for kind, op in wanted
    ]
    admin = _admin(kafka)  # referenced until the futures resolve: its handle owns them
    _wait(admin.create_acls(bindings))


def read_only_topic(
    kafka: ApacheKafka, topic: str, operations: tuple[str, ...] = ("Read",)
) -> None:
    """Create ``topic`` as the super user and let the worker only Describe it and do
    ``operations`` (Read by default)."""
    admin = _admin(kafka)
    _wait(admin.create_topics([NewTopic(topic, 2, 1)]))
    allowed = {"Read": AclOperation.READ, "Write": AclOperation.WRITE}
    bindings = [
        AclBinding(
            ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, PRINCIPAL, "*", op,
            AclPermissionType.ALLOW,
        )
        for op in (AclOperation.DESCRIBE, *(allowed[name] for name in operations))
    ]  # fmt: skip
    _wait(admin.create_acls(bindings))


# --- worker settings -------------------------------------------------------------------


def security_settings(listener: str, certificates: Certificates) -> dict[str, Any]:
    """The worker's Kafka security settings for the ``SASL`` or ``MTLS`` listener."""
    if listener == "SASL":
        return {
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": WORKER,
            "kafka_sasl_password": SASL_PASSWORD,
            "kafka_ssl_ca_file": certificates.ca,
        }
    return {
        "kafka_security_protocol": "SSL",
        "kafka_ssl_ca_file": certificates.ca,
        "kafka_ssl_cert_file": certificates.client_cert,
        "kafka_ssl_key_file": certificates.client_key,
        "kafka_ssl_key_password": KEY_PASSWORD,
    }


@pytest.fixture
def secure_settings(
    secure_kafka: ApacheKafka, certificates: Certificates, served_model: Path
) -> Iterator[Callable[..., Settings]]:
    """Factory: deployed worker settings on one listener, every name under one prefix.

    ``secure_settings(listener, prefix, **overrides)``: the consumer group is ``prefix``
    and every topic ``prefix.<role>``, so one prefixed ACL of each kind covers the worker
    (its repartition topic and transactional ids derive from the
    group). Redis keys are deleted when the test ends.
    """
    made: list[Settings] = []

    def factory(listener: str, prefix: str, **overrides: Any) -> Settings:
        roles = ("transactions", "labels", "scores", "alerts", "shadow_scores", "controls")
        topics = {f"topic_{role}": f"{prefix}.{role}" for role in roles}
        topics["topic_dead_letters"] = f"{prefix}.transactions.dlq"
        topics["topic_label_dead_letters"] = f"{prefix}.labels.dlq"
        values = {
            **topics,
            **security_settings(listener, certificates),
            "group_id": prefix,
            "model_dir": served_model,
            **overrides,
        }
        broker = Broker("kafka", secure_kafka.listener_servers(listener))
        settings = new_settings(broker, **values)
        made.append(settings)
        return settings

    yield factory
    for settings in made:
        delete_state(settings.state_key_prefix)


def prefix() -> str:
    """A name prefix no other test uses."""
    return f"sec-{uuid.uuid4().hex[:8]}"


def no_secret_in(text: str) -> None:
    """Fail if any of this module's secrets appears in ``text``."""
    for secret in SECRETS:
        assert secret not in text, "a secret appears in the output"


def wait_for_labels(worker: WorkerProcess, count: int, timeout_s: float) -> None:
    """Until the worker has handled ``count`` labels (every outcome): its labels path works."""
    deadline = time.monotonic() + timeout_s
    handled = 0.0
    while time.monotonic() < deadline:
        samples = worker.scrape()
        handled = sum(v for k, v in samples.items() if k.startswith("fraudstream_labels_total{"))
        if handled >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{handled:.0f} of {count} labels handled:\n{worker.log()}")


# --- the worker works with the right settings ------------------------------------------


@pytest.mark.parametrize("listener", ["SASL", "MTLS"])
def test_the_worker_scores_over_an_authenticated_listener_with_only_its_acls(
    listener: str,
    secure_kafka: ApacheKafka,
    secure_settings: Callable[..., Settings],
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    name = prefix()
    grant(secure_kafka, name)
    settings = secure_settings(listener, name, log_level="DEBUG")
    replayed = [
        Message(m.topic, m.key, m.value)
        for m in replay_messages(
            small_transactions.frame,
            transactions_topic=settings.topic_transactions,
            labels_topic=settings.topic_labels,
            labels_delay=datetime.timedelta(hours=1),
            all_labels=True,
            limit=REPLAY_TRANSACTIONS,
        )
    ]
    transactions = [m for m in replayed if m.topic == settings.topic_transactions]
    labels = len(replayed) - len(transactions)
    ids = transaction_ids(transactions)
    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        publish(settings, replayed)  # as the worker's principal: it may write its input
        records = read_records(settings, settings.topic_scores, ids=ids, timeout_s=90)
        wait_for_labels(worker, labels, timeout_s=60)
        with urllib.request.urlopen(worker.metrics_url, timeout=5) as response:
            metrics_text = response.read().decode()
        assert worker.terminate() == 0, worker.log()
        log = worker.log_path.read_text(errors="replace")
    account(score_records(records), ids).assert_complete()
    assert settings.exactly_once and settings.idempotent_producer  # as deployed
    no_secret_in(log)
    no_secret_in(metrics_text)


# --- what no retry fixes stops it at start-up ------------------------------------------


@dataclass(frozen=True)
class StartUpCase:
    """A wrong setting or a missing ACL, and what the error must name."""

    listener: str
    grants: dict[str, Any]  # keyword arguments of :func:`grant`
    overrides: Callable[[str, Certificates], dict[str, Any]]
    names: Callable[[str], tuple[str, ...]]


START_UP_CASES: dict[str, StartUpCase] = {
    "wrong SCRAM password": StartUpCase(
        "SASL",
        {},
        lambda _p, _c: {"kafka_sasl_password": WRONG_PASSWORD},
        lambda _p: ("FRAUDSTREAM_KAFKA_SASL_PASSWORD", "SCRAM-SHA-512"),
    ),
    "SASL mechanism the listener does not enable": StartUpCase(
        "SASL",
        {},
        lambda _p, _c: {"kafka_sasl_mechanism": "SCRAM-SHA-256"},
        lambda _p: ("FRAUDSTREAM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
    ),
    "untrusted CA over SASL_SSL": StartUpCase(
        "SASL",
        {},
        lambda _p, c: {"kafka_ssl_ca_file": c.other_ca},
        lambda _p: ("FRAUDSTREAM_KAFKA_SSL_CA_FILE",),
    ),
    "untrusted CA over mutual TLS": StartUpCase(
        "MTLS",
        {},
        lambda _p, c: {"kafka_ssl_ca_file": c.other_ca},
        lambda _p: ("FRAUDSTREAM_KAFKA_SSL_CA_FILE",),
    ),
    "no ACL on the consumer group": StartUpCase(
        "SASL",
        {"groups": False},
        lambda _p, _c: {},
        lambda p: (f"consumer group {p}", "FRAUDSTREAM_GROUP_ID"),
    ),
    "no ACL on the transactional id": StartUpCase(
        "MTLS",
        {"transactional_ids": False},
        lambda _p, _c: {},
        lambda p: (f"transactional id {p}-scoring-test", "FRAUDSTREAM_GROUP_ID"),
    ),
    "no Read ACL on the controls topic": StartUpCase(
        "SASL",
        {},
        lambda p, _c: {"topic_controls": f"nr-{p}.controls"},
        lambda p: (f"Read topic nr-{p}.controls", "FRAUDSTREAM_TOPIC_CONTROLS"),
    ),
    "no Create ACL on missing topics": StartUpCase(
        "SASL",
        {"topics": ("Read", "Write", "Describe")},
        lambda _p, _c: {},
        lambda p: (f"{p}.scores", "FRAUDSTREAM_CREATE_TOPICS"),
    ),
    "no Write ACL on the scores topic": StartUpCase(
        "MTLS",
        {},
        lambda p, _c: {"topic_scores": f"ro-{p}.scores"},
        lambda p: (f"Write topic ro-{p}.scores", "FRAUDSTREAM_TOPIC_SCORES"),
    ),
}


@pytest.mark.parametrize("case", list(START_UP_CASES))
def test_a_wrong_setting_or_missing_acl_stops_the_worker_at_start_up(
    case: str,
    secure_kafka: ApacheKafka,
    secure_settings: Callable[..., Settings],
    certificates: Certificates,
) -> None:
    spec = START_UP_CASES[case]
    name = prefix()
    grant(secure_kafka, name, **spec.grants)
    overrides = spec.overrides(name, certificates)
    if "topic_scores" in overrides:
        read_only_topic(secure_kafka, overrides["topic_scores"])
    if "topic_controls" in overrides:
        read_only_topic(secure_kafka, overrides["topic_controls"], operations=())
    settings = secure_settings(spec.listener, name, log_level="DEBUG", **overrides)
    started = time.monotonic()
    code, output = run_worker_to_exit(settings, timeout_s=START_UP_BOUND_S)
    elapsed = time.monotonic() - started
    said = next((line for line in output.splitlines() if line.startswith("error:")), "")
    print(f"{case}: exit {code} after {elapsed:.1f} s: {said}")
    assert code == 2, output
    assert "error:" in output and "Traceback" not in output, output
    for expected in spec.names(name):
        assert expected in output, output
    no_secret_in(output)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_broker_without_idempotent_producers_stops_the_worker_at_start_up(
    guarantee: str, bundled_broker: Broker, served_model: Path
) -> None:
    # The bundled broker answers InitProducerId with UnknownError: before the start-up
    # checks the worker retried it forever.
    settings = new_settings(
        bundled_broker,
        model_dir=served_model,
        idempotent_producer=True,
        processing_guarantee=guarantee,
    )
    try:
        started = time.monotonic()
        code, output = run_worker_to_exit(settings, timeout_s=START_UP_BOUND_S)
        elapsed = time.monotonic() - started
        said = next((line for line in output.splitlines() if line.startswith("error:")), "")
        print(f"bundled broker, {guarantee}: exit {code} after {elapsed:.1f} s: {said}")
    finally:
        delete_state(settings.state_key_prefix)
    assert code == 2, output
    producer = "a transactional" if guarantee == "exactly_once" else "an idempotent"
    assert f"cannot initialise {producer} producer" in output, output
    assert "FRAUDSTREAM_IDEMPOTENT_PRODUCER=false" in output, output
    assert "FRAUDSTREAM_PROCESSING_GUARANTEE=at_least_once" in output, output
    assert "Traceback" not in output


def test_a_session_timeout_the_broker_refuses_stops_the_worker_at_start_up(
    apache_kafka: Broker, served_model: Path
) -> None:
    # Apache Kafka accepts 6 s to 30 min by default; below, every JoinGroup fails with
    # InvalidSessionTimeoutError, which the group clients retried for ever.
    settings = new_settings(apache_kafka, model_dir=served_model, consumer_session_timeout_s=3.0)
    try:
        code, output = run_worker_to_exit(settings, timeout_s=START_UP_BOUND_S)
    finally:
        delete_state(settings.state_key_prefix)
    assert code == 2, output
    assert "FRAUDSTREAM_CONSUMER_SESSION_TIMEOUT_S=3 is outside the range" in output, output
    assert "between 6 and 1800 seconds" in output, output
    assert "Traceback" not in output


def run_worker_for(settings: Settings, seconds: float, log_path: Path) -> tuple[bool, str]:
    """Run the worker for ``seconds``, then kill it; returns (was it still running, output)."""
    with WorkerProcess(settings, log_path).spawn() as worker:
        time.sleep(seconds)
        still_running = worker.running()
    return still_running, log_path.read_text(errors="replace")


def test_a_client_certificate_the_broker_refuses_is_retried_with_a_hint(
    secure_kafka: ApacheKafka,
    secure_settings: Callable[..., Settings],
    certificates: Certificates,
    tmp_path: Path,
) -> None:
    # Under TLS 1.3 the broker refuses a client certificate by closing the connection,
    # which the client cannot tell from a dropped one: retried, with the setting to check.
    name = prefix()
    grant(secure_kafka, name)
    settings = secure_settings(
        "MTLS",
        name,
        kafka_ssl_cert_file=certificates.stranger_cert,
        kafka_ssl_key_file=certificates.stranger_key,
        kafka_ssl_key_password=None,
        retry_backoff_max_s=0.5,
    )
    still_running, output = run_worker_for(settings, 8, tmp_path / "worker.log")
    assert still_running, output
    assert f"FRAUDSTREAM_KAFKA_SSL_CERT_FILE={certificates.stranger_cert}" in output, output


def test_an_unreachable_broker_is_retried_and_named_without_secrets(
    secure_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # Every secret set (SASL password, an encrypted client key), at DEBUG, towards a port
    # nobody listens on: a broker that may come later is waited for, not a wrong setting.
    address = f"127.0.0.1:{free_port()}"
    settings = secure_settings(
        "MTLS",
        prefix(),
        kafka_bootstrap_servers=address,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username=WORKER,
        kafka_sasl_password=SASL_PASSWORD,
        log_level="DEBUG",
        retry_backoff_max_s=0.5,
    )
    still_running, output = run_worker_for(settings, 10, tmp_path / "worker.log")
    assert still_running, output
    assert f"connecting to Kafka at {address} (FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS)" in output
    assert output.count("retrying in") >= 3, output
    no_secret_in(output)
