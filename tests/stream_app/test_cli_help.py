"""Every command's help reads whole at 80 columns, and options that mean the same thing
have the same name in every command (an old name stays as a hidden alias)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

COMMANDS = (
    "worker", "settings", "demo", "replay", "simulate", "train", "evaluate", "export",
    "score-file", "rebuild-state", "bench", "console",
)  # fmt: skip


def _help(*command: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", *command, "--help"],
        env={**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _options(text: str) -> set[str]:
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", text, re.M))


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_fits_80_columns_without_cutting_anything(command: str) -> None:
    text = _help(*([command] if command else []))
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long
    assert "…" not in text  # rich's tables cut option names and words at 80 columns


def test_the_same_thing_has_the_same_option_name_everywhere() -> None:
    options = {command: _options(_help(command)) for command in COMMANDS}
    # A model directory to read is --model-dir wherever a command takes one.
    for command in ("demo", "bench", "score-file", "export"):
        assert "--model-dir" in options[command] and "--model" not in options[command]
    # The simulated population: the demo's names are simulate's.
    for name in ("--n-customers", "--n-days", "--seed"):
        assert name in options["demo"] and name in options["simulate"]
    assert "--customers" not in options["demo"]  # the old name: hidden, still accepted
