"""Redis with TLS and a password; the Kafka credentials Faust gets; no secret in any output.

* Redis: a test-owned ``redis-server`` with only a TLS port, ``--requirepass``, and a
  certificate made here with openssl. The worker scores with the right settings, and with
  wrong ones (bad password, no password, a CA that did not sign the server) fails at
  start-up with exit code 2, a message naming the setting to fix, and no traceback.
* Kafka security (SASL_SSL, mutual TLS, ACLs) is proven against Apache Kafka in
  ``tests/stream_app/kafka/test_security.py``; here only that Faust is handed the same
  credentials as the worker's own clients.
* Secrets never appear in the worker's log (even at DEBUG), in its configuration errors,
  or in ``--help`` and ``settings`` output.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from stream_app.config import Settings, load_settings
from stream_app.kafka import config as kafka_config
from tests.kafka_fixtures import Dataset
from tests.resilience_helpers import (
    account,
    environment_without_settings,
    make_certificates,
    publish,
    read_records,
    run_worker_to_exit,
    score_records,
    transaction_ids,
    transaction_messages,
)
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import WorkerProcess

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
    other_ca: Path  # a CA that signed nothing we serve


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(directory / "good")
    other_ca, _, _ = make_certificates(directory / "other", name="other")
    return Certificates(ca, cert, key, other_ca)


@pytest.fixture
def tls_redis(tmp_path: Path, certificates: Certificates) -> Iterator[RedisServer]:
    server = RedisServer(
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


# --- Redis ---------------------------------------------------------------------------


def test_the_worker_scores_with_redis_over_tls_with_a_password(
    make_settings: Callable[..., Settings],
    served_model: Path,
    small_transactions: Dataset,
    certificates: Certificates,
    tls_redis: RedisServer,
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
    tls_redis: RedisServer,
) -> None:
    cases: dict[str, dict[str, Any]] = {
        "wrong password": {"redis_password": WRONG_PASSWORD, "redis_ssl_ca_file": certificates.ca},
        "no password": {"redis_ssl_ca_file": certificates.ca},
        "wrong CA": {"redis_password": REDIS_PASSWORD, "redis_ssl_ca_file": certificates.other_ca},
    }
    overrides = cases[case]
    settings = make_settings(model_dir=served_model, redis_url=tls_redis.url, **overrides)
    code, output = run_worker_to_exit(settings, START_UP_TIMEOUT_S)
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


def test_no_secret_in_the_log_of_a_worker_refused_by_redis(
    make_settings: Callable[..., Settings],
    served_model: Path,
    certificates: Certificates,
    tls_redis: RedisServer,
    tmp_path: Path,
) -> None:
    # At DEBUG: Kafka is fine, the Redis URL carries a wrong password and the right one is
    # set apart. (A Kafka that cannot be reached, with every Kafka secret set, is
    # tests/stream_app/kafka/test_security.py's.)
    settings = make_settings(
        model_dir=served_model,
        log_level="DEBUG",
        redis_url=f"rediss://default:{WRONG_PASSWORD}@127.0.0.1:{tls_redis.port}/0",
        redis_ssl_ca_file=certificates.ca,
        redis_password=REDIS_PASSWORD,
        retry_backoff_max_s=0.5,
    )
    code, output = run_worker_to_exit(settings, START_UP_TIMEOUT_S)
    assert code == 2, output
    assert "Redis" in output, output  # it said why
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
