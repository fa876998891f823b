"""Session-wide fixtures: the real Redis, and (later) the bundled Kafka-protocol broker."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.cleanup import (
    delete_test_keys,
    issue_prefix,
    leftover_folders,
    leftover_keys,
    remove_session_tmpdir,
    session_tmpdir,
)
from tests.kafka_fixtures import (  # noqa: F401  (fixtures, re-exported for every test)
    apache_kafka,
    bundled_broker,
    kafka_broker,
    make_settings,
    small_transactions,
)
from tests.model_fixtures import (  # noqa: F401  (fixtures, re-exported for every test)
    poisoned_model,
    second_model,
    served_model,
)
from tests.redis_cluster import redis_cluster_fixture  # noqa: F401  (one cluster a session)

REDIS_URL = os.environ.get("FRAUDSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own for the session (initdb + pg_ctl, a free port)."""
    from training.ops.services.postgres import PostgresServer

    with PostgresServer() as server:
        yield server.url


def new_database(base_url: str) -> str:
    """The URL of a fresh database on the session's PostgreSQL server."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return issue_prefix()


@pytest.fixture
async def redis_client(redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the real Redis; the test's keys are deleted afterwards."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=False)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - the environment is broken, say so loudly
        pytest.fail(f"the real Redis at {REDIS_URL} is not reachable: {exc}")
    yield client
    async for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


# --- nothing left behind (tests/cleanup.py) -----------------------------------------
_SESSION_TMP = pytest.StashKey[Path]()
_SESSION_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    """Every temporary folder of the session, subprocesses' too, inside one folder."""
    config.stash[_SESSION_TMP] = session_tmpdir()


@pytest.fixture(autouse=True)
def _delete_issued_redis_keys() -> Iterator[None]:
    """The keys of every prefix the test was issued go when it ends (autouse: first up,
    last down, after the workers and brokers of the test have stopped)."""
    yield
    delete_test_keys()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it left Redis keys under its prefixes or folders in its /tmp."""
    session.config.stash[_SESSION_FAILED] = exitstatus != pytest.ExitCode.OK
    problems: list[str] = []
    if keys := leftover_keys():
        listed = ", ".join(f"{prefix} ({n})" for prefix, n in list(keys.items())[:10])
        problems.append(f"Redis keys left in {REDIS_URL}: {listed}")
    directory = session.config.stash.get(_SESSION_TMP, None)
    if directory is not None and (folders := leftover_folders(directory)):
        problems.append(f"left in the temporary folder {directory}: {', '.join(folders[:10])}")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            if reporter is not None:
                reporter.write_line(f"LEFT BEHIND: {problem}", red=True, bold=True)
        if exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's temporary folder (pytest's tree kept when tests failed)."""
    directory = config.stash.get(_SESSION_TMP, None)
    if directory is not None:
        failed = config.stash.get(_SESSION_FAILED, False)
        remove_session_tmpdir(directory, keep_pytest_tree=failed)
