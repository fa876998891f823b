"""A command run without its extra names the install that brings it.

``stream_app.cli.COMMANDS`` says where each command lives and which modules it imports from
which extra; these tests hold it to ``pyproject.toml`` (every module listed comes from a
distribution that extra requires) and to the commands that exist, and show that a command
whose module cannot be imported stops the CLI instead of going missing. The quick start test
runs ``fraudstream train`` in an environment with the demo extra only and reads the
message (``tests/test_quick_start.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stream_app.cli import (
    COMMAND_EXTRAS,
    app,
    missing_extra,
    register_commands,
)

ROOT = Path(__file__).resolve().parents[2]
# Commands that need nothing beyond the serving install.
SERVING = {"worker", "settings", "rebuild-state"}


def _requirement_names(extra: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"][extra]
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.mark.parametrize("command", sorted(COMMAND_EXTRAS))
def test_each_module_a_command_needs_comes_from_its_extra(command: str) -> None:
    extra, modules = COMMAND_EXTRAS[command]
    wanted = _requirement_names(extra)
    providers = packages_distributions()
    for module in modules:
        names = {d.lower() for d in providers.get(module, [])}
        assert names & wanted, f"{module} ({names}) is not required by the {extra!r} extra"


def test_every_command_is_either_serving_or_names_its_extra() -> None:
    register_commands()
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == SERVING | set(COMMAND_EXTRAS)


def test_an_installed_extra_raises_no_complaint() -> None:
    # This environment has every extra (tests/setup.sh installs them all).
    assert all(missing_extra(command) is None for command in COMMAND_EXTRAS)


def test_labels_export_without_its_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg made unimportable, as in an install without the console extra.
    register_commands()
    monkeypatch.setitem(sys.modules, "psycopg", None)
    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(app, ["labels", "export", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "fraudstream[console]" in result.output and "psycopg" in result.output
    assert not out.exists()


def test_a_command_whose_module_fails_to_import_is_an_error_not_a_missing_command() -> None:
    # An offline command of a broken module (here one that does not exist), registered the
    # one way commands are: the CLI stops with the import error instead of leaving it out.
    code = (
        "import stream_app.cli as cli; "
        "cli.COMMANDS['broken'] = cli.CommandSpec('training.no_such_module:command', 'demo', ()); "
        "cli.main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0, done.stdout
    assert "No module named 'training.no_such_module'" in done.stderr, done.stderr
