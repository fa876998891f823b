"""Redis with TLS and a password; Kafka SSL and SASL settings; no secret in any output.

* Redis: a test-owned ``redis-server`` with only a TLS port, ``--requirepass``, and a
  certificate made here with openssl. The worker scores with the right settings, and with
  wrong ones (bad password, no password, a CA that did not sign the server) fails at
  start-up with exit code 2, a message naming the setting to fix, and no traceback.
* Kafka: the bundled broker has no TLS, so a real aiokafka client is pointed at
  :class:`~tests.resilience_helpers.FakeSaslBroker`, which sees what actually reaches the
  wire: TLS verified against the configured CA, the client certificate, the client id, the
  SASL mechanism, the user name, and the password (PLAIN) or a valid SCRAM proof of it.
* Secrets never appear in the worker's log (even at DEBUG), in its configuration errors,
  or in ``--help`` and ``settings`` output.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_app import kafka_config
from stream_app.config import Settings, load_settings, settings_environment
from tests.kafka_fixtures import Dataset, WorkerProcess
from tests.resilience_helpers import (
    FakeSaslBroker,
    OwnedRedis,
    account,
    environment_without_settings,
    make_certificates,
    publish,
    read_records,
    score_records,
    transaction_ids,
    transaction_messages,
)
from training.services.net import free_port

pytestmark = [pytest.mark.integration, pytest.mark.resilience]

# Distinctive values, so a grep for them cannot match anything else.
REDIS_PASSWORD = "r3dis-pw-1f0c9a"
WRONG_PASSWORD = "wr0ng-pw-77aa31"
SASL_PASSWORD = "k4fka-pw-9b2e40"
KEY_PASSWORD = "k3y-pw-5d31c8"
SECRETS = (REDIS_PASSWORD, WRONG_PASSWORD, SASL_PASSWORD, KEY_PASSWORD)
START_UP_TIMEOUT_S = 30


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path
    encrypted_key: Path  # ``key`` under KEY_PASSWORD
    other_ca: Path  # a CA that signed nothing we serve


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(directory / "good")
    other_ca, _, _ = make_certificates(directory / "other", name="other")
    encrypted = directory / "good" / "server.enc.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
         "-out", str(encrypted)],
        check=True, capture_output=True,
    )  # fmt: skip
    return Certificates(ca, cert, key, encrypted, other_ca)


@pytest.fixture
def tls_redis(tmp_path: Path, certificates: Certificates) -> Iterator[OwnedRedis]:
    server = OwnedRedis(
        tmp_path / "redis",
        durable=False,
        password=REDIS_PASSWORD,
        tls=(certificates.ca, certificates.cert, certificates.key),
    ).start()
    yield server
    server.stop()


def _no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a secret appears in the output"


def run_worker_to_exit(
    settings: Settings, timeout_s: float = START_UP_TIMEOUT_S
) -> tuple[int, str]:
    """Run ``fraudstream worker`` until it exits by itself; returns (code, stdout+stderr)."""
    env = {**environment_without_settings(), **settings_environment(settings)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stream_app.cli", "worker"],
            env=env,
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace"
        )
        pytest.fail(f"the worker did not fail fast, it kept going:\n{output[-3000:]}")
    return done.returncode, done.stdout.decode(errors="replace") + done.stderr.decode(
        errors="replace"
    )


# --- Redis ---------------------------------------------------------------------------


def test_the_worker_scores_with_redis_over_tls_with_a_password(
    make_settings: Callable[..., Settings],
    served_model: Path,
    small_transactions: Dataset,
    certificates: Certificates,
    tls_redis: OwnedRedis,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        model_dir=served_model,
        redis_url=tls_redis.url,
        redis_password=REDIS_PASSWORD,
        redis_ssl_ca_file=certificates.ca,
        log_level="DEBUG",
    )
    messages = transaction_messages(small_transactions.frame, settings, limit=500)
    ids = transaction_ids(messages)
    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        publish(settings, messages)
        records = read_records(settings, settings.topic_scores, ids=ids, timeout_s=60)
        log = worker.log_path.read_text(errors="replace")
        assert worker.terminate() == 0, worker.log()
    account(score_records(records), ids).assert_complete()
    client = redis.Redis(
        host="127.0.0.1",
        port=tls_redis.port,
        ssl=True,
        ssl_ca_certs=str(certificates.ca),
        password=REDIS_PASSWORD,
    )
    with client:
        assert list(client.scan_iter(match=f"{settings.state_key_prefix}:c:*", count=1000))
    _no_secret_in(log)


@pytest.mark.parametrize(
    ("case", "fix"),
    [
        ("wrong password", "FRAUDSTREAM_REDIS_PASSWORD"),
        ("no password", "FRAUDSTREAM_REDIS_PASSWORD"),
        ("wrong CA", "FRAUDSTREAM_REDIS_SSL_CA_FILE"),
    ],
)
def test_wrong_redis_credentials_stop_the_worker_at_start_up(
    case: str,
    fix: str,
    make_settings: Callable[..., Settings],
    served_model: Path,
    certificates: Certificates,
    tls_redis: OwnedRedis,
) -> None:
    overrides: dict[str, object] = {
        "wrong password": {"redis_password": WRONG_PASSWORD, "redis_ssl_ca_file": certificates.ca},
        "no password": {"redis_ssl_ca_file": certificates.ca},
        "wrong CA": {"redis_password": REDIS_PASSWORD, "redis_ssl_ca_file": certificates.other_ca},
    }[case]
    settings = make_settings(model_dir=served_model, redis_url=tls_redis.url, **overrides)
    code, output = run_worker_to_exit(settings)
    assert code == 2, output
    assert "error:" in output and fix in output, output
    assert "Traceback" not in output
    _no_secret_in(output)


# --- Kafka -----------------------------------------------------------------------------


def _kafka_settings(bootstrap: str, **overrides: object) -> Settings:
    return load_settings(
        kafka_bootstrap_servers=bootstrap,
        group_id="sec-test",
        instance_id="replica-1",
        idempotent_producer=False,
        **overrides,
    )


async def _connect(settings: Settings) -> None:
    """Start a producer and a consumer as the worker builds them; they cannot succeed."""
    producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
    consumer = AIOKafkaConsumer(**kafka_config.consumer_kwargs(settings, "sec-test.scoring"))
    for client in (producer, consumer):
        with pytest.raises(Exception):  # noqa: B017  (authentication refused, or TLS)
            await asyncio.wait_for(client.start(), 10)
        await client.stop()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_kafka_sasl_ssl_settings_reach_the_clients_exactly(
    mechanism: str, certificates: Certificates
) -> None:
    fake = FakeSaslBroker(certificates.cert, certificates.key, SASL_PASSWORD)
    async with fake:
        settings = _kafka_settings(
            fake.bootstrap_servers,
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username="svc-fraudstream",
            kafka_sasl_password=SASL_PASSWORD,
            kafka_ssl_ca_file=certificates.ca,
        )
        await _connect(settings)
    assert set(fake.client_ids) == {"sec-test-replica-1"}
    assert set(fake.mechanisms) == {mechanism}
    assert len(fake.usernames) >= 2 and set(fake.usernames) == {"svc-fraudstream"}
    if mechanism == "PLAIN":
        assert set(fake.passwords) == {SASL_PASSWORD}
    else:
        assert fake.proofs_valid and all(fake.proofs_valid)  # the password, proven


async def test_kafka_mutual_tls_settings_reach_the_clients(certificates: Certificates) -> None:
    fake = FakeSaslBroker(
        certificates.cert, certificates.key, SASL_PASSWORD, client_ca=certificates.ca
    )
    async with fake:
        settings = _kafka_settings(
            fake.bootstrap_servers,
            kafka_security_protocol="SSL",
            kafka_ssl_ca_file=certificates.ca,
            kafka_ssl_cert_file=certificates.cert,
            kafka_ssl_key_file=certificates.encrypted_key,
            kafka_ssl_key_password=KEY_PASSWORD,
        )
        producer = AIOKafkaProducer(**kafka_config.producer_kwargs(settings))
        with pytest.raises(Exception):  # noqa: B017  (the fake answers nothing but versions)
            await asyncio.wait_for(producer.start(), 5)
        await producer.stop()
    assert set(fake.client_ids) == {"sec-test-replica-1"}
    subjects = [dict(field[0] for field in c["subject"]) for c in fake.client_certificates]
    assert subjects and all(s["commonName"] == "127.0.0.1" for s in subjects)
    assert not fake.mechanisms  # SSL: no SASL


async def test_no_credential_goes_to_a_broker_the_ca_does_not_vouch_for(
    certificates: Certificates,
) -> None:
    fake = FakeSaslBroker(certificates.cert, certificates.key, SASL_PASSWORD)
    async with fake:
        settings = _kafka_settings(
            fake.bootstrap_servers,
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="svc-fraudstream",
            kafka_sasl_password=SASL_PASSWORD,
            kafka_ssl_ca_file=certificates.other_ca,
        )
        await _connect(settings)
    assert not fake.client_ids and not fake.passwords


def test_faust_gets_the_same_kafka_credentials(certificates: Certificates) -> None:
    settings = _kafka_settings(
        "kafka-1:9093,kafka-2:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc-fraudstream",
        kafka_sasl_password=SASL_PASSWORD,
        kafka_ssl_ca_file=certificates.ca,
    )
    credentials = kafka_config.faust_credentials(settings)
    assert type(credentials).__name__ == "SASLCredentials"
    assert credentials.username == "svc-fraudstream"
    assert credentials.password == SASL_PASSWORD
    assert str(credentials.mechanism.value) == "SCRAM-SHA-512"
    assert credentials.ssl_context.get_ca_certs()[0]["subject"] == (
        (("commonName", "fraudstream test ca"),),
    )
    assert settings.bootstrap_servers == ["kafka-1:9093", "kafka-2:9093"]


# --- secrets in output -----------------------------------------------------------------


@pytest.mark.parametrize("failing", ["kafka", "redis"])
def test_no_secret_in_the_log_of_a_worker_that_cannot_connect(
    failing: str,
    make_settings: Callable[..., Settings],
    served_model: Path,
    certificates: Certificates,
    tls_redis: OwnedRedis,
    tmp_path: Path,
) -> None:
    # Every secret set, at DEBUG. "kafka": SASL_SSL with a client key under a password,
    # towards a port nobody listens on: every attempt fails and is logged. "redis": Kafka
    # is fine, the Redis URL carries a wrong password (and the right one is set apart).
    kafka: dict[str, object] = {
        "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "PLAIN",
        "kafka_sasl_username": "svc-fraudstream",
        "kafka_sasl_password": SASL_PASSWORD,
        "kafka_ssl_ca_file": certificates.ca,
        "kafka_ssl_cert_file": certificates.cert,
        "kafka_ssl_key_file": certificates.encrypted_key,
        "kafka_ssl_key_password": KEY_PASSWORD,
    }
    settings = make_settings(
        model_dir=served_model,
        log_level="DEBUG",
        redis_url=f"rediss://default:{WRONG_PASSWORD}@127.0.0.1:{tls_redis.port}/0",
        redis_ssl_ca_file=certificates.ca,
        retry_backoff_max_s=0.5,
        **(kafka if failing == "kafka" else {"redis_password": REDIS_PASSWORD}),
    )
    env = {**environment_without_settings(), **settings_environment(settings)}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            process.wait(timeout=8)  # it may stop (a refused password) or keep retrying
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    output = log_path.read_text(errors="replace")
    assert ("Kafka" if failing == "kafka" else "Redis") in output, output  # it said why
    _no_secret_in(output)


def test_a_configuration_error_does_not_echo_a_secret(tmp_path: Path) -> None:
    env = {
        **environment_without_settings(),
        "FRAUDSTREAM_REDIS_URL": f"ftp://app:{REDIS_PASSWORD}@cache:6379/0",
        "FRAUDSTREAM_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",  # no user name: also an error
    }
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 2, output
    assert "FRAUDSTREAM_REDIS_URL" in output and "FRAUDSTREAM_KAFKA_SASL_USERNAME" in output
    assert "Traceback" not in output
    _no_secret_in(output)


@pytest.mark.parametrize("command", [["worker", "--help"], ["settings"], ["--help"]])
def test_help_and_settings_show_no_secret(command: list[str]) -> None:
    env = {
        **environment_without_settings(),
        "FRAUDSTREAM_REDIS_URL": f"redis://app:{REDIS_PASSWORD}@cache:6379/0",
        "FRAUDSTREAM_REDIS_PASSWORD": REDIS_PASSWORD,
        "FRAUDSTREAM_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "FRAUDSTREAM_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
    }
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *command],
        env=env,
        capture_output=True,
        timeout=60,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    assert output.strip()
    _no_secret_in(output)
