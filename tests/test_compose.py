"""docker-compose.yml, the Dockerfile and the lock files agree with the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_app import config
from stream_app.console.settings import ConsoleSettings, console_env_name
from tests.lockfile import DEV, LOCKS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = ROOT / "stream_app" / "Dockerfile"
SERVICES: dict[str, Any] = COMPOSE["services"]
KNOWN_ENV = {config.env_name(name) for name in config.Settings.model_fields}
CONSOLE_ENV = {console_env_name(name) for name in ConsoleSettings.model_fields}
# The secrets compose reads from the environment (it refuses to start without them).
SECRETS = {
    "FRAUDSTREAM_CONSOLE_SECRET_KEY": "k" * 48,
    "FRAUDSTREAM_POSTGRES_PASSWORD": "test-password",
}
_INTERPOLATION = re.compile(r"\$\{([A-Z_]+):\?[^}]*\}")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as compose passes it, the secrets set to test values."""
    env = service.get("environment", {})
    return {
        str(k): _INTERPOLATION.sub(lambda m: SECRETS[m.group(1)], str(v)) for k, v in env.items()
    }


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is missing: run `bash tests/setup.sh`")
    return subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_docker_compose_validates_the_file() -> None:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    result = _compose_config({**clean, **SECRETS})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_commits_no_secret_and_refuses_to_start_without_it(missing: str) -> None:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    result = _compose_config({**clean, **{k: v for k, v in SECRETS.items() if k != missing}})
    assert result.returncode != 0 and f"set {missing}" in result.stderr, result.stderr


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) >= {
        "kafka",
        "redis",
        "worker",
        "replayer",
        "console",
        "postgres",
        "prometheus",
        "grafana",
    }
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]


def test_every_mounted_host_path_exists() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_builds_name_files_that_exist() -> None:
    for name, service in SERVICES.items():
        build = service.get("build")
        if build is None:
            continue
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        assert f"AS {build['target']}" in DOCKERFILE.read_text(), name
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_every_environment_variable_is_a_setting_and_valid() -> None:
    env_lines = re.findall(r"(FRAUDSTREAM_[A-Z_]+)=", DOCKERFILE.read_text())
    seen: dict[str, str] = {}
    for name, service in SERVICES.items():
        for key, value in _environment(service).items():
            if key in CONSOLE_ENV:
                continue  # the console's own settings: checked by the console test below
            if key.startswith("FRAUDSTREAM_"):
                assert key in KNOWN_ENV, f"{name}: {key} is not a setting"
                seen[key] = value
    for key in env_lines:
        assert key in KNOWN_ENV, f"Dockerfile: {key} is not a setting"
    model_dir = seen.pop("FRAUDSTREAM_MODEL_DIR")
    assert model_dir.startswith("/app/")
    assert (ROOT / model_dir.removeprefix("/app/")).is_dir(), "the image has no such model"
    overrides = {key.removeprefix("FRAUDSTREAM_").lower(): value for key, value in seen.items()}
    settings = config.Settings.model_validate(overrides)
    assert settings.kafka_bootstrap_servers == "kafka:9092"


def test_the_worker_metrics_port_is_the_one_prometheus_scrapes() -> None:
    port = _environment(SERVICES["worker"])["FRAUDSTREAM_METRICS_PORT"]
    assert port in SERVICES["worker"]["expose"]
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["job_name"] == "fraudstream-worker"
    assert str(job["dns_sd_configs"][0]["port"]) == port
    assert job["dns_sd_configs"][0]["names"] == ["worker"]
    assert f"EXPOSE {port}" in DOCKERFILE.read_text()


def test_prometheus_and_grafana_mounts_match_their_configs() -> None:
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    mounts = [v.split(":")[1] for v in SERVICES["prometheus"]["volumes"]]
    for rule_file in scrape["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts
    grafana_mounts = [v.split(":")[1] for v in SERVICES["grafana"]["volumes"]]
    assert "/var/lib/grafana/dashboards" in grafana_mounts
    assert "/etc/grafana/provisioning" in grafana_mounts


def test_the_worker_scales_without_fixed_host_ports_or_names() -> None:
    worker = SERVICES["worker"]
    assert "ports" not in worker and "container_name" not in worker


@pytest.mark.parametrize("stage", sorted(set(LOCKS) - {DEV.name}))
def test_each_image_stage_installs_its_lock(stage: str) -> None:
    """The image's stages install the locks tests/test_lock_files.py keeps to the dev lock."""
    text = DOCKERFILE.read_text()
    assert f" AS {stage}\n" in text
    body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    copied = LOCKS[stage].path.relative_to(ROOT)
    target = re.search(rf"^COPY {re.escape(str(copied))} (\S+)$", body, re.M)
    assert target is not None, f"the {stage} stage does not copy {copied}"
    assert f"pip install --no-deps -r {target.group(1)}" in body


def _kafka_property(env_name: str) -> str:
    # The apache/kafka image maps KAFKA_FOO_BAR to foo.bar.
    return env_name.removeprefix("KAFKA_").lower().replace("_", ".")


def test_the_tests_kafka_runs_what_compose_deploys() -> None:
    from training.ops.services.apache_kafka import COMPOSE_SETTINGS, ApacheKafka, kafka_version

    kafka = SERVICES["kafka"]
    assert kafka["image"] == f"apache/kafka:{kafka_version()}"
    deployed = {_kafka_property(k): v for k, v in _environment(kafka).items()}
    for key, value in COMPOSE_SETTINGS.items():
        assert deployed.get(key) == value, f"{key}: compose {deployed.get(key)!r}, tests {value!r}"
    # Single node, no TLS: the same listeners and protocols as the compose service.
    broker = ApacheKafka()
    node = _single_node(broker)
    props = broker.properties(node)
    for key, value in COMPOSE_SETTINGS.items():
        assert props[key] == value
    assert set(props["listener.security.protocol.map"].split(",")) == set(
        deployed["listener.security.protocol.map"].split(",")
    )
    assert [x.split("://")[0] for x in props["listeners"].split(",")] == [
        x.split("://")[0] for x in deployed["listeners"].split(",")
    ]
    # The worker the compose file deploys runs the tests' Apache Kafka lane settings.
    worker = _environment(SERVICES["worker"])
    assert worker["FRAUDSTREAM_PROCESSING_GUARANTEE"] == "exactly_once"
    assert worker["FRAUDSTREAM_IDEMPOTENT_PRODUCER"] == "true"


def _single_node(broker: Any) -> Any:
    from training.ops.services.apache_kafka import _Node

    node = _Node(1, Path("/nonexistent"), {"PLAINTEXT": 9092, "CONTROLLER": 9093})
    broker._nodes.append(node)
    return node


def test_the_console_runs_the_workers_image_with_its_kafka_settings() -> None:
    console, worker = SERVICES["console"], SERVICES["worker"]
    assert console["image"] == worker["image"] and "build" not in console
    assert console["command"] == ["fraudstream", "console"]
    # The image installs the console's dependencies (the worker stage's lock has them).
    assert "console" in LOCKS[worker["build"]["target"]].extras
    console_env, worker_env = _environment(console), _environment(worker)
    for key in ("FRAUDSTREAM_KAFKA_BOOTSTRAP_SERVERS", "FRAUDSTREAM_TOPIC_PARTITIONS"):
        assert console_env[key] == worker_env[key], key
    for key in console_env:
        assert key in KNOWN_ENV or key in CONSOLE_ENV, f"console: {key} is not a setting"
    overrides = {
        key.removeprefix("FRAUDSTREAM_CONSOLE_").lower(): value
        for key, value in console_env.items()
        if key in CONSOLE_ENV
    }
    settings = ConsoleSettings.model_validate(overrides)
    assert settings.secret_key is not None  # one key for every replica and restart
    assert f"{settings.port}:{settings.port}" in console["ports"]
    assert str(settings.metrics_port) in console["expose"]
    assert f":{settings.port}/healthz" in " ".join(console["healthcheck"]["test"])
    assert {"kafka", "postgres"} <= set(console["depends_on"])
    for service in ("kafka", "postgres"):
        assert console["depends_on"][service]["condition"] == "service_healthy", service


def test_the_consoles_database_is_the_postgres_service() -> None:
    from urllib.parse import urlsplit

    from training.ops.services.postgres import postgres_bin

    console_env = _environment(SERVICES["console"])
    url = urlsplit(console_env["FRAUDSTREAM_CONSOLE_DATABASE_URL"])
    postgres = SERVICES["postgres"]
    pg_env = _environment(postgres)
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"] == SECRETS["FRAUDSTREAM_POSTGRES_PASSWORD"]
    assert url.path == "/" + pg_env["POSTGRES_DB"]
    image, tag = postgres["image"].split(":")
    assert image == "postgres"
    # The major version the console's PostgreSQL tests run (training/ops/services/postgres.py).
    assert tag.split("-")[0].split(".")[0] == postgres_bin().parent.name
    assert "pg_isready" in postgres["healthcheck"]["test"]
    volume = postgres["volumes"][0].split(":")
    assert volume[0] in COMPOSE["volumes"] and volume[1] == "/var/lib/postgresql/data"
    assert "ports" not in postgres, "the database is for the console only"


def test_prometheus_scrapes_the_console() -> None:
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    sd = jobs["fraudstream-console"]["dns_sd_configs"][0]
    assert sd["names"] == ["console"]
    assert str(sd["port"]) == _environment(SERVICES["console"])["FRAUDSTREAM_CONSOLE_METRICS_PORT"]
    assert "console" in SERVICES["prometheus"]["depends_on"]
