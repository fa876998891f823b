"""The end-of-session check (tests/conftest.py, tests/cleanup.py) fails a run that leaves
Redis keys or folders behind, and still removes the folders.

A pytest run in a subprocess runs the two probes below, which litter on purpose; the
probes are skipped in any other run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis

from tests.cleanup import REDIS_URL, issue_prefix

PROBE = "FRAUDSTREAM_TEST_LEAK_PROBE"
probe = pytest.mark.skipif(os.environ.get(PROBE) != "1", reason="run by the test below only")
_issued: list[str] = []


@probe
def test_probe_issues_a_prefix_and_leaves_a_folder() -> None:
    _issued.append(issue_prefix())
    tempfile.mkdtemp(prefix="probe-")


@probe
def test_probe_writes_under_the_previous_tests_prefix() -> None:
    # A worker of the previous test still writing after that test ended.
    redis.Redis.from_url(REDIS_URL).set(f"{_issued[0]}:late", b"1", ex=120)


def test_a_run_that_leaves_keys_or_folders_fails() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "probe"],
        cwd=root,
        env={**os.environ, PROBE: "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    leaked = re.search(r"Redis keys left in \S+: (test-[0-9a-f]+) \(1\)", output)
    folder = re.search(r"left in the temporary folder (\S+): probe-", output)
    try:
        assert done.returncode == pytest.ExitCode.TESTS_FAILED, output
        assert "2 passed" in output, output
        assert leaked and folder, output
        # The folders are removed all the same: nothing stays in /tmp.
        assert not Path(folder.group(1)).exists()
    finally:
        if leaked:
            redis.Redis.from_url(REDIS_URL).delete(f"{leaked.group(1)}:late")


def test_a_clean_run_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "probe"],
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if k != PROBE},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "LEFT BEHIND" not in done.stdout
