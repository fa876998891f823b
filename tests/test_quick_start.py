"""The README's quick start, typed into a terminal as a new user would.

The project's tracked files are copied to a scratch folder with a new virtual environment
(nothing of the test run's own environment in it), and the README's first command is typed
into a real terminal (tmux) with no Kafka, Redis or ``FRAUDSTREAM_*`` setting given. The
test reads the screen: the install ends, the demo's live view appears (its panel and the
latest alerts with their reasons), then its closing summary, its explanation and the next
steps, and the command exits 0. Then ``fraudstream train``, which needs the training
extra, names the install that brings it and exits 2. pip's cache is used when it has the
wheels (CI installed them a moment before); ``python -m training.ops.install_report`` measures
a cold install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from training.ops.install_report import copy_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TIMEOUT_S = 420.0
EXIT = re.compile(r"^QUICKSTART-EXIT=(\d+)$", re.MULTILINE)


def quick_start_command() -> str:
    """The first command of the README's quick start (its first ``bash`` block)."""
    quick_start = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.+?)\n```", quick_start, re.DOTALL)
    assert block is not None, "the quick start has no bash block"
    return block.group(1).strip()


class Terminal:
    """A tmux session on a private server: type into it, read its screen."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.socket = f"fraudstream-test-{uuid.uuid4().hex[:8]}"
        self.name = "quickstart"
        self._tmux(
            "new-session", "-d", "-s", self.name, "-x", "120", "-y", "50", "-c", str(cwd),
            "bash --noprofile --norc", env=env,
        )  # fmt: skip

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=30,
        )
        return done.stdout

    def type(self, line: str) -> None:
        self._tmux("send-keys", "-t", self.name, line, "Enter")

    def screen(self) -> str:
        """What the terminal shows now, with its scroll-back."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", self.name)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[tuple[Terminal, Path]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (tests/setup.sh installs it)")
    project = copy_project(tmp_path / "fraudstream")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FRAUDSTREAM_", "REDIS_", "PYTHON", "VIRTUAL_ENV", "TMUX"))
    }
    env |= {"TERM": "xterm-256color", "COLUMNS": "120", "LINES": "50"}
    term = Terminal(project, env)
    try:
        yield term, tmp_path / "venv"
    finally:
        term.close()


def test_the_readme_quick_start_in_a_terminal_on_a_fresh_environment(
    terminal: tuple[Terminal, Path],
) -> None:
    term, venv = terminal
    command = quick_start_command()
    assert command.startswith("pip install") and command.endswith("fraudstream demo"), command
    # The quotes keep the typed line from reading as the marker the command prints.
    term.type(f". {venv}/bin/activate && {command}; echo QUICKSTART-EXIT''=$?")

    seen_live = False
    deadline = time.monotonic() + TIMEOUT_S
    screen = ""
    while time.monotonic() < deadline:
        screen = term.screen()
        # The live view: its panel, its alerts table with reasons, while the demo runs.
        if "fraudstream demo" in screen and "latest alerts" in screen and "reasons" in screen:
            seen_live = seen_live or "Next steps:" not in screen
        if EXIT.search(screen):
            break
        time.sleep(0.5)
    exit_code = EXIT.search(screen)
    assert exit_code is not None and exit_code.group(1) == "0", screen[-6000:]
    assert seen_live, f"the live view never showed:\n{screen[-6000:]}"
    for closing in (
        "Alerts against the known labels",
        "precision of alerts",
        "recall of alerts",
        "review cut-off",
        "Next steps:",
    ):
        assert closing in screen, f"{closing!r} missing:\n{screen[-6000:]}"
    scored = re.search(r"transactions scored\s*│\s*([\d,]+)", screen)
    assert scored is not None and int(scored.group(1).replace(",", "")) > 1000, screen[-6000:]
    assert "Traceback" not in screen, screen[-6000:]

    # The next thing a new user tries, in the demo's install: a command of another extra.
    term.type("fraudstream train; echo TRAIN-EXIT''=$?")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "TRAIN-EXIT=" not in (screen := term.screen()):
        time.sleep(0.5)
    assert "TRAIN-EXIT=2" in screen, screen[-3000:]
    assert 'pip install -e ".[train]"' in screen.split("TRAIN-EXIT''")[-1], screen[-3000:]
