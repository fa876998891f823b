"""The README stays true: its tables are generated from the code, its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from stream_app.cli import app, register_commands
from stream_app.config import settings_table
from stream_app.metrics import metrics_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_configuration_table_is_current() -> None:
    assert settings_table() in README, "paste `fraudstream settings` into README.md"


def test_metrics_table_is_current() -> None:
    assert metrics_table() in README, "paste stream_app.metrics.metrics_table() into README"


def test_the_two_setup_commands_are_the_ones_ci_runs() -> None:
    assert 'pip install -e ".[demo]" && fraudstream demo' in README
    assert "bash tests/check.sh" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "bash tests/check.sh"


def test_every_command_in_the_readme_exists_with_help() -> None:
    register_commands()
    runner = CliRunner()
    named = set(re.findall(r"`fraudstream ([a-z-]+)", README))
    assert {
        "demo",
        "worker",
        "replay",
        "simulate",
        "train",
        "evaluate",
        "score-file",
        "bench",
    } <= named
    for command in sorted(named):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, f"fraudstream {command} --help: {result.output}"


def test_benchmark_tables_are_generated_from_the_reports() -> None:
    from training.readme_tables import SECTIONS, render

    for name in SECTIONS:
        assert f"<!-- BEGIN generated: {name} " in README, f"README lacks the {name} part"
    assert render(README) == README, "run `python -m training.readme_tables`"
