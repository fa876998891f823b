"""docker-compose.yml, the Dockerfile and the lock files agree with the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from stream_app import config
from tests.lockfile import LOCKS, closure

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = ROOT / "stream_app" / "Dockerfile"
SERVICES: dict[str, Any] = COMPOSE["services"]
KNOWN_ENV = {config.env_name(name) for name in config.Settings.model_fields}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {str(k): str(v) for k, v in env.items()}


def test_docker_compose_validates_the_file() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is missing: run `bash tests/setup.sh`")
    result = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) >= {"kafka", "redis", "worker", "replayer", "prometheus", "grafana"}
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


@pytest.mark.parametrize("stage", sorted(LOCKS))
def test_lock_files_pin_the_whole_dependency_closure(stage: str) -> None:
    extras, path = LOCKS[stage]
    pins = dict(
        line.split("==") for line in path.read_text().splitlines() if line and line[0] != "#"
    )
    assert set(pins) == set(closure(extras)), "run python -m tests.lockfile"
    from importlib import metadata

    for requirement in metadata.requires("fraudstream") or []:
        req = Requirement(requirement)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in pins:
            assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} breaks {req}"


def _kafka_property(env_name: str) -> str:
    # The apache/kafka image maps KAFKA_FOO_BAR to foo.bar.
    return env_name.removeprefix("KAFKA_").lower().replace("_", ".")


def test_the_tests_kafka_runs_what_compose_deploys() -> None:
    from training.services.apache_kafka import COMPOSE_SETTINGS, ApacheKafka, kafka_version

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
    from training.services.apache_kafka import _Node

    node = _Node(1, Path("/nonexistent"), {"PLAINTEXT": 9092, "CONTROLLER": 9093})
    broker._nodes.append(node)
    return node
