"""``fraudstream settings``: the values the worker would use, where each came from, secrets
masked, and exit code 2 naming the variable when a value is invalid."""

from __future__ import annotations

import os
import subprocess
import sys

from stream_app.config import SECRET_MASK, settings_table

PASSWORD = "s3cret-pw-41d9"


def _settings(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSTREAM_")}
    base.pop("REDIS_URL", None)
    base.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "settings", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _rows(output: str) -> dict[str, str]:
    rows = {}
    for line in output.splitlines():
        if line.startswith("FRAUDSTREAM_"):
            variable, rest = line.split(maxsplit=1)
            rows[variable] = rest
    return rows


def test_settings_show_effective_values_and_where_they_came_from() -> None:
    done = _settings(
        FRAUDSTREAM_BATCH_SIZE="120",
        REDIS_URL=f"redis://app:{PASSWORD}@cache:6379/2",
        FRAUDSTREAM_KAFKA_SASL_PASSWORD=PASSWORD,
    )
    assert done.returncode == 0, done.stderr
    rows = _rows(done.stdout)
    assert rows["FRAUDSTREAM_BATCH_SIZE"] == "120  (environment)"
    assert rows["FRAUDSTREAM_REDIS_URL"] == "redis://app:***@cache:6379/2  (REDIS_URL)"
    assert rows["FRAUDSTREAM_KAFKA_SASL_PASSWORD"] == f"{SECRET_MASK}  (environment)"
    assert rows["FRAUDSTREAM_TOPIC_SCORES"] == "scores"  # a default: no source given
    assert "3 of " in done.stdout and "set by the environment" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr
    # Readable at 80 columns.
    assert all(len(line) <= 80 for line in done.stdout.splitlines())


def test_an_invalid_value_exits_2_naming_the_variable() -> None:
    done = _settings(FRAUDSTREAM_BATCH_SIZE="lots", FRAUDSTREAM_KAFKA_SASL_PASSWORD=PASSWORD)
    assert done.returncode == 2
    assert "FRAUDSTREAM_BATCH_SIZE" in done.stderr and "'lots'" in done.stderr
    assert "Traceback" not in done.stderr and PASSWORD not in done.stderr + done.stdout


def test_the_reference_is_the_readme_table() -> None:
    done = _settings("--reference", FRAUDSTREAM_BATCH_SIZE="120")
    assert done.returncode == 0
    assert done.stdout == settings_table()
