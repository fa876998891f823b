"""A Redis password in the URL never shows, in any form, and special characters are safe.

A ``redis-server`` of the test's own requires a password holding ``/``, ``@``, ``#``, ``?``,
``%`` and ``:``. The worker is given it in the URL, percent-encoded, in the user
information and as ``?password=``; it starts while Redis is still down, so its log holds
connection retries, then connects and scores. Written unencoded (a ``/``, ``#`` or ``?``
would end the URL's authority early), it stops at start-up with exit code 2 and a message
naming ``FRAUDSTREAM_REDIS_URL``. In every case the whole log (at DEBUG) holds the password
in no form: raw, percent-encoded either way, form-encoded, nor any piece of it between its
special characters. (A wrong password is refused without echo already:
``tests/stream_app/worker/test_resilience_security.py``.) A password rotated while the worker
runs stops it with exit code 1 and an ERROR naming the setting, instead of a retry for ever.

Only the bundled broker lane: the Redis URL is read and used the same way whatever the
broker; the lanes differ in Kafka settings only.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
import redis

from stream_app.config import settings_environment
from tests.kafka_fixtures import Broker, Dataset, new_settings
from tests.resilience_helpers import (
    account,
    environment_without_settings,
    publish,
    read_records,
    score_records,
    transaction_ids,
    transaction_messages,
    wait_until,
)
from training.ops.services.redis_server import RedisServer
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.resilience]

# Pieces of six or more characters between the special ones, so that a log holding any
# piece (a parser that stopped at a '/', say) is caught, and none can match by chance.
PASSWORD = "Zq7vLx/Tk9pQa@Wm3nHe#Rp5sJd?Ys8uFb%Gh2kTw:Nc4xVe"
PIECES = ("Zq7vLx", "Tk9pQa", "Wm3nHe", "Rp5sJd", "Ys8uFb", "Gh2kTw", "Nc4xVe")
START_UP_TIMEOUT_S = 30


def _forms(password: str, pieces: tuple[str, ...] = ()) -> set[str]:
    """Every way a password could be written into a log."""
    return {
        password,
        quote(password, safe=""),
        quote(password),  # '/' left as is
        quote_plus(password),
        password.replace("%", "%25"),
        *pieces,
    }


def _assert_no_password(text: str) -> None:
    shown = [form for form in _forms(PASSWORD, PIECES) if form in text]
    assert not shown, f"the Redis password shows in the log ({len(shown)} forms)"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A password-protected redis-server, not started: each test starts it when it wants."""
    server = RedisServer(tmp_path / "redis", durable=False, password=PASSWORD)
    yield server
    server.stop()


def test_a_percent_encoded_password_works_and_never_shows_across_retries(
    bundled_broker: Broker,
    served_model: Path,
    small_transactions: Dataset,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    encoded = quote(PASSWORD, safe="")
    where = f"127.0.0.1:{redis_server.port}"
    urls = {
        "user information": f"redis://:{encoded}@{where}/0",
        "query": f"redis://{where}/0?password={encoded}",
    }
    for form, url in urls.items():
        settings = new_settings(
            bundled_broker,
            model_dir=served_model,
            redis_url=url,
            log_level="DEBUG",
            retry_backoff_max_s=0.5,
        )
        log_path = tmp_path / f"worker-{form.replace(' ', '-')}.log"
        log_path.touch()

        def retries(path: Path = log_path) -> int:
            return path.read_text(errors="replace").count("connecting to Redis at")

        def start_redis_after_retries() -> None:
            # Redis comes up only once the worker has logged a few failed connections.
            wait_until(lambda: retries() >= 3, 60, "connection retries in the log")
            redis_server.start()

        starter = threading.Thread(target=start_redis_after_retries, daemon=True)
        starter.start()
        messages = transaction_messages(small_transactions.frame, settings, limit=200)
        ids = transaction_ids(messages)
        try:
            with WorkerProcess(settings, log_path).start() as worker:
                publish(settings, messages)
                records = read_records(settings, settings.topic_scores, ids=ids, timeout_s=60)
                assert worker.terminate() == 0, worker.log()
        finally:
            starter.join(timeout=60)
            redis_server.stop()  # not durable: the next form starts from an empty Redis
        log = log_path.read_text(errors="replace")
        account(score_records(records), ids).assert_complete()
        assert retries() >= 3, log[-3000:]
        assert "connecting to Redis at redis://" in log
        _assert_no_password(log)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis://:{raw}@{where}/0", id="unencoded-in-user-information"),
        pytest.param("redis://{where}/0?password={raw}", id="unencoded-in-query"),
        pytest.param("redis://admin:{raw}@{where}/0", id="unencoded-with-user-name"),
    ],
)
def test_an_unencoded_password_is_refused_at_start_up_without_echo(
    url: str, bundled_broker: Broker, served_model: Path, redis_server: RedisServer
) -> None:
    redis_server.start()
    base = new_settings(bundled_broker, model_dir=served_model, log_level="DEBUG")
    env = {
        **environment_without_settings(),
        **settings_environment(base),
        "FRAUDSTREAM_REDIS_URL": url.format(raw=PASSWORD, where=f"127.0.0.1:{redis_server.port}"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker"],
        env=env,
        capture_output=True,
        timeout=START_UP_TIMEOUT_S,
    )
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 2, output
    assert "FRAUDSTREAM_REDIS_URL" in output and "percent-encoded" in output, output
    assert "Traceback" not in output
    _assert_no_password(output)


def test_a_password_rotated_while_the_worker_runs_stops_it_saying_what_to_fix(
    bundled_broker: Broker,
    served_model: Path,
    small_transactions: Dataset,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    # Redis takes a new password and drops every connection: the worker's next state call
    # reconnects with the old one. No retry changes that, so it stops (exit code 1) with an
    # ERROR naming the setting, its batch uncommitted, instead of retrying for ever.
    redis_server.start()
    encoded = quote(PASSWORD, safe="")
    settings = new_settings(
        bundled_broker,
        model_dir=served_model,
        redis_url=f"redis://:{encoded}@127.0.0.1:{redis_server.port}/0",
        log_level="DEBUG",
        retry_backoff_max_s=0.5,
    )
    messages = transaction_messages(small_transactions.frame, settings, limit=400)
    first, rest = messages[:200], messages[200:]
    log_path = tmp_path / "worker.log"
    with WorkerProcess(settings, log_path).start() as worker:
        publish(settings, first)
        read_records(settings, settings.topic_scores, ids=transaction_ids(first), timeout_s=60)
        admin = redis.Redis(host="127.0.0.1", port=redis_server.port, password=PASSWORD)
        try:
            admin.config_set("requirepass", PASSWORD[::-1])
            admin.client_kill_filter(_type="normal", skipme=True)
        finally:
            admin.close()
        publish(settings, rest)
        assert worker.process is not None
        code = worker.process.wait(timeout=60)
    log = log_path.read_text(errors="replace")
    assert code == 1, log[-3000:]
    assert "which no retry changes" in log and "FRAUDSTREAM_REDIS_URL" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    _assert_no_password(log)
    _assert_no_password_reversed(log)


def _assert_no_password_reversed(text: str) -> None:
    reversed_pieces = tuple(piece[::-1] for piece in PIECES)
    shown = [form for form in _forms(PASSWORD[::-1], reversed_pieces) if form in text]
    assert not shown, f"the new Redis password shows in the log ({len(shown)} forms)"
