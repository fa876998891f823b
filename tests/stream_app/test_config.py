"""Settings: read from the environment, refused with a useful message, secrets never shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from stream_app.config import (
    MIN_STATE_TTL_S,
    Settings,
    env_name,
    load_settings,
    redact_url,
    settings_environment,
    settings_table,
    unknown_environment,
)
from stream_app.errors import ConfigError
from stream_app.kafka.config import client_kwargs, consumer_kwargs, producer_kwargs

SECRET = "s3cr3t-do-not-print"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment with no setting in it."""
    for key in list(os.environ):
        if key.upper().startswith("FRAUDSTREAM_") or key in (
            "REDIS_URL",
            "KAFKA_BOOTSTRAP_SERVERS",
        ):
            monkeypatch.delenv(key)


def test_defaults_are_valid_and_documented() -> None:
    settings = load_settings()
    assert settings.topic_transactions == "transactions"
    assert settings.topic_dead_letters == "transactions.dlq"
    assert settings.topic_shadow_scores == "scores.shadow"
    assert settings.model_dir == Path("onnx_models/default")
    assert settings.processing_guarantee == "at_least_once"
    assert settings.idempotent_producer is True
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_environment_is_read_with_prefix_and_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSTREAM_BATCH_SIZE", "250")
    monkeypatch.setenv("FRAUDSTREAM_TOPIC_SCORES", "scores.v2")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092, kafka-2:9093")
    monkeypatch.setenv("REDIS_URL", "rediss://cache:6380/1")
    settings = load_settings()
    assert settings.batch_size == 250
    assert settings.topic_scores == "scores.v2"
    assert settings.bootstrap_servers == ["kafka-1:9092", "kafka-2:9093"]
    assert settings.redis_url.get_secret_value() == "rediss://cache:6380/1"
    # The prefixed name wins over the common one.
    monkeypatch.setenv("FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS", "kafka-3:9092")
    assert load_settings().bootstrap_servers == ["kafka-3:9092"]


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.batch_size = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FRAUDSTREAM_BATCH_SIZE", "0", "FRAUDSTREAM_BATCH_SIZE: Input should be greater"),
        ("FRAUDSTREAM_BATCH_SIZE", "many", "FRAUDSTREAM_BATCH_SIZE: Input should be a valid"),
        ("FRAUDSTREAM_PROCESSING_GUARANTEE", "exactly", "FRAUDSTREAM_PROCESSING_GUARANTEE"),
        ("FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT", "SECURITY_PROTOCOL"),
        ("FRAUDSTREAM_TOPIC_SCORES", "has space", "FRAUDSTREAM_TOPIC_SCORES"),
        ("FRAUDSTREAM_STATE_TTL_S", "3600", "FRAUDSTREAM_STATE_TTL_S"),
        ("KAFKA_BOOTSTRAP_SERVERS", "no-port", "is not host:port"),
        ("REDIS_URL", "http://cache:6379", "must start with redis://"),
    ],
)
def test_a_wrong_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_cross_field_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="SASL_USERNAME and FRAUDSTREAM_KAFKA_SASL_PASSWORD"):
        load_settings()
    with pytest.raises(ConfigError, match="IDEMPOTENT_PRODUCER=true"):
        load_settings(
            kafka_security_protocol="PLAINTEXT",
            processing_guarantee="exactly_once",
            idempotent_producer=False,
        )
    with pytest.raises(ConfigError, match="must not exceed"):
        load_settings(
            kafka_security_protocol="PLAINTEXT", review_threshold=0.9, decline_threshold=0.5
        )
    with pytest.raises(ConfigError, match="is not a readable file"):
        load_settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="use a rediss:// URL"):
        ca = tmp_path / "ca.pem"
        ca.write_text("x")
        load_settings(kafka_security_protocol="PLAINTEXT", redis_ssl_ca_file=ca)
    with pytest.raises(ConfigError, match="distinct topics"):
        load_settings(kafka_security_protocol="PLAINTEXT", topic_alerts="scores")


def test_secrets_never_appear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FRAUDSTREAM_KAFKA_SASL_USERNAME", "app")
    monkeypatch.setenv("FRAUDSTREAM_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("REDIS_URL", f"redis://app:{SECRET}@cache:6379/0")
    settings = load_settings()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in settings.redis_display_url
    assert settings.redis_display_url == "redis://app:***@cache:6379/0"
    assert SECRET not in settings_table()
    # A wrong secret is reported without its value.
    monkeypatch.setenv("FRAUDSTREAM_BATCH_SIZE", "0")
    monkeypatch.setenv("FRAUDSTREAM_REDIS_URL", f"ftp://app:{SECRET}@cache")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert SECRET not in str(caught.value)
    # But the clients get them.
    monkeypatch.delenv("FRAUDSTREAM_BATCH_SIZE")
    monkeypatch.delenv("FRAUDSTREAM_REDIS_URL")
    assert client_kwargs(load_settings())["sasl_plain_password"] == SECRET


def test_redact_url_leaves_urls_without_password() -> None:
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"
    assert redact_url("rediss://:pw@cache:6380") == "rediss://:***@cache:6380"


def test_settings_table_lists_every_setting_with_its_default() -> None:
    table = settings_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| Variable | Default | Description |"
    assert len(lines) == 2 + len(Settings.model_fields)
    for name in Settings.model_fields:
        assert f"`{env_name(name)}`" in table
    assert "| `FRAUDSTREAM_BATCH_SIZE` | `1000` |" in table
    assert "(or `REDIS_URL`)" in table
    assert "`FRAUDSTREAM_KAFKA_SASL_PASSWORD` | `unset` |" in table


def test_unknown_variables_are_reported_with_a_suggestion() -> None:
    environ = {
        "FRAUDSTREAM_BATCHSIZE": "5",
        "FRAUDSTREAM_BATCH_SIZE": "5",
        "FRAUDSTREAM_TEST_REDIS_URL": "redis://x",
        "HOME": "/root",
    }
    assert unknown_environment(environ) == [
        "FRAUDSTREAM_BATCHSIZE (did you mean FRAUDSTREAM_BATCH_SIZE?)"
    ]


def test_settings_environment_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(
        batch_size=17,
        redis_url=SecretStr("redis://:pw@cache:1/0"),
        idempotent_producer=False,
        model_dir=Path("/models/x"),
    )
    env = settings_environment(settings)
    assert env["FRAUDSTREAM_BATCH_SIZE"] == "17"
    assert env["FRAUDSTREAM_REDIS_URL"] == "redis://:pw@cache:1/0"
    assert env["FRAUDSTREAM_IDEMPOTENT_PRODUCER"] == "false"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = load_settings()
    assert again.batch_size == 17 and again.model_dir == Path("/models/x")
    assert again.redis_url == settings.redis_url and again.idempotent_producer is False


def test_client_arguments_follow_the_security_protocol(tmp_path: Path) -> None:
    plain = load_settings(idempotent_producer=False, batch_size=300)
    kwargs = producer_kwargs(plain)
    assert kwargs["security_protocol"] == "PLAINTEXT" and "ssl_context" not in kwargs
    assert kwargs["enable_idempotence"] is False and kwargs["acks"] == "all"
    consumer = consumer_kwargs(plain, "group")
    assert consumer["enable_auto_commit"] is False and consumer["max_poll_records"] == 300
    assert consumer["isolation_level"] == "read_uncommitted"
    scram = load_settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="app",
        kafka_sasl_password=SecretStr(SECRET),
    )
    kwargs = client_kwargs(scram)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["ssl_context"] is not None  # system CAs verify the brokers
    eos = load_settings(processing_guarantee="exactly_once")
    assert consumer_kwargs(eos, "g")["isolation_level"] == "read_committed"
    assert producer_kwargs(eos, transactional_id="t")["transactional_id"] == "t"


def test_a_broken_certificate_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    settings = load_settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=bad)
    with pytest.raises(ConfigError, match="TLS context"):
        client_kwargs(settings)


def test_state_ttl_covers_the_terminal_windows() -> None:
    assert MIN_STATE_TTL_S == 38 * 86_400
    assert load_settings(state_ttl_s=MIN_STATE_TTL_S).state_ttl_s == MIN_STATE_TTL_S


def test_worker_command_exits_2_on_a_wrong_setting_without_traceback_or_secret() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")},
        "FRAUDSTREAM_BATCH_SIZE": "-1",
        "FRAUDSTREAM_KAFKA_SASL_PASSWORD": SECRET,
    }
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "FRAUDSTREAM_BATCH_SIZE" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert SECRET not in done.stderr + done.stdout


def test_worker_command_exits_2_without_a_model(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")},
        "FRAUDSTREAM_MODEL_DIR": str(tmp_path / "nothing-here"),
        "FRAUDSTREAM_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "nothing-here" in done.stderr and "train" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_shows_no_secret() -> None:
    env = {**os.environ, "FRAUDSTREAM_KAFKA_SASL_PASSWORD": SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert SECRET not in done.stdout
