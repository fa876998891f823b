"""What the tests leave behind, and the end-of-session check that fails the run on it.

Two kinds of litter outlived test runs: Redis keys (with a 45-day TTL) in the shared Redis
the tests did not start, and folders in ``/tmp``. Both are now owned by the session:

* every Redis key prefix a test uses comes from :func:`issue_prefix` (the ``redis_prefix``
  fixture, ``new_settings`` and the tests that build a store by hand), which records it;
  the keys of the prefixes a test was issued are deleted when that test ends, and at the
  end of the session any key left under any of them fails the run (a worker still
  writing after its test, a helper that bypassed the cleanup);
* the session runs with its own temporary folder (``TMPDIR`` and :mod:`tempfile`, which
  subprocesses inherit); at the end, anything left in it other than pytest's own
  ``tmp_path`` tree fails the run, and the folder is removed.

Prefix tracking rather than a before/after scan of the whole Redis and ``/tmp``: other
test sessions may run at the same time on the same machine and their keys and folders
are not this session's litter.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Final

import redis

REDIS_URL = os.environ.get("FRAUDSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

_session_prefixes: set[str] = set()
_test_prefixes: list[str] = []


def issue_prefix(kind: str = "test", length: int = 12) -> str:
    """A Redis key prefix no other test uses, deleted when the current test ends."""
    prefix = f"{kind}-{uuid.uuid4().hex[:length]}"
    register_prefix(prefix)
    return prefix


def register_prefix(prefix: str) -> None:
    """Track a prefix made elsewhere: its keys are deleted after the test and checked."""
    _session_prefixes.add(prefix)
    _test_prefixes.append(prefix)


def keep_for_fixture(prefix: str) -> None:
    """A prefix a module- or session-scoped fixture made: its keys outlive the test that
    first asked for the fixture (the fixture deletes them at its teardown); the end of the
    session still checks them."""
    with contextlib.suppress(ValueError):
        _test_prefixes.remove(prefix)


def _keys(client: redis.Redis, prefix: str) -> list[bytes]:
    # "prefix*", not "prefix:*": derived prefixes ("<prefix>-file") are the test's too.
    return list(client.scan_iter(match=f"{prefix}*", count=1000))


def delete_test_keys() -> None:
    """Delete the keys of every prefix issued since the last call (one test's)."""
    prefixes = list(_test_prefixes)
    _test_prefixes.clear()
    if not prefixes:
        return
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            for prefix in prefixes:
                keys = _keys(client, prefix)
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start : start + 1000])
        finally:
            client.close()


def leftover_keys() -> dict[str, int]:
    """Keys still present under the session's prefixes, counted by prefix."""
    left: dict[str, int] = {}
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            for prefix in sorted(_session_prefixes):
                if count := len(_keys(client, prefix)):
                    left[prefix] = count
        finally:
            client.close()
    return left


def session_tmpdir() -> Path:
    """Point :mod:`tempfile` and subprocesses (``TMPDIR``) at a folder of this session."""
    directory = Path(tempfile.mkdtemp(prefix="fraudstream-tests-"))
    os.environ["TMPDIR"] = str(directory)
    tempfile.tempdir = str(directory)
    return directory


# Not litter: pytest's own tmp_path tree, and libraries' caches that have one fixed name
# per user and are reused by every run (torch's inductor cache), rather than one per run.
_NOT_LITTER: Final = ("pytest-of-", "torchinductor_")


def leftover_folders(directory: Path) -> list[str]:
    """The folders the session left in its temporary folder (files such as onnxruntime's
    ``.ses`` are one fixed name reused by every run, and are not counted)."""
    if not directory.exists():
        return []
    return sorted(
        p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(_NOT_LITTER)
    )


def remove_session_tmpdir(directory: Path, keep_pytest_tree: bool) -> None:
    """Remove the session folder; on a failed run keep pytest's tree to inspect."""
    if keep_pytest_tree and any(directory.glob("pytest-of-*")):
        for entry in directory.iterdir():
            if not entry.name.startswith("pytest-of-"):
                shutil.rmtree(entry, ignore_errors=True)
        return
    shutil.rmtree(directory, ignore_errors=True)
