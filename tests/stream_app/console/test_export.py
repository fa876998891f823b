"""``fraudstream labels export`` and ``fraudstream train --labels`` on real case stores.

Verdicts are recorded through the case store's own API (claim, verdict, a supervisor's
correction, an escalation) on SQLite and on a PostgreSQL server this module starts; the
label file is written by the command, then applied to a small simulated transactions file,
by :func:`training.dataset.apply_label_files` and through ``fraudstream train --labels``.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from stream_app.cli import app, register_commands
from stream_app.console.export import LABEL_FILE_COLUMNS, LabelColumn
from stream_app.console.store import CaseStore, Outcome
from stream_app.records import Decision, ScoreRecord, iso_utc_millis
from tests.conftest import new_database
from training.dataset import apply_label_files
from training.transactions import TRANSACTION_COLUMNS, read_transactions

register_commands()
runner = CliRunner()
URL_VARIABLE = "FRAUDSTREAM_CONSOLE_DATABASE_URL"
T0 = 1_790_000_000.0  # verdict times: fixed, so both databases give the same file
CORRECTED_AT = T0 + 3600.0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated transactions file: enough weeks and frauds for one quick fit."""
    path = tmp_path_factory.mktemp("labels") / "tx.parquet"
    simulate = [
        "simulate", "--out", str(path), "--n-customers", "150", "--n-terminals", "300",
        "--n-days", "25", "--radius", "10",
    ]  # fmt: skip
    result = runner.invoke(app, simulate)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def frame(data: Path) -> pd.DataFrame:
    return read_transactions(data)


def _new_database(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database: a SQLite file path, or a new PostgreSQL database."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'cases.db'}"
    return new_database(request.getfixturevalue("postgres_url"))


def _create_schema(url: str) -> str:
    """Create the console's tables, as the console does when it starts."""
    store = CaseStore(url)
    try:
        store.create_schema()
    finally:
        store.close()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty case store (its tables created) on each database."""
    return _create_schema(_new_database(request.param, request, tmp_path))


@dataclass(frozen=True)
class Verdicts:
    """What was decided on which transaction of the file, and what the file must then say."""

    expected: dict[str, tuple[str, str, int]]  # id -> (customer, terminal, TX_FRAUD)
    flipped_to_fraud: int
    flipped_to_genuine: int
    confirmed_fraud: int
    corrected: int
    escalated: int
    mismatched: int
    unknown: str


def _alert(tx: pd.Series, *, customer: str | None = None, tx_id: str | None = None) -> ScoreRecord:
    return ScoreRecord(
        transaction_id=tx_id or str(tx["TRANSACTION_ID"]),
        customer_id=customer or str(tx["CUSTOMER_ID"]),
        terminal_id=str(tx["TERMINAL_ID"]),
        amount=float(tx["TX_AMOUNT"]),
        event_time=iso_utc_millis(tx["TX_DATETIME"].timestamp()),
        score=0.9,
        decision=Decision.REVIEW,
        reasons=("test alert",),
        model_version="m1",
        scored_at=iso_utc_millis(T0),
    )


def _record_verdicts(url: str, frame: pd.DataFrame) -> Verdicts:
    """Alerts on transactions of ``frame`` and analysts' verdicts on them, as the console
    records them: fraud on a genuine one, legitimate on a fraud, fraud confirmed, fraud
    corrected to legitimate by a supervisor, an escalation (no label), a case whose alert
    named another customer than the transaction's, and one on a transaction not in the file.
    """
    genuine = frame[frame["TX_FRAUD"] == 0].iloc[[10, 20, 30, 40]]
    frauds = frame[frame["TX_FRAUD"] == 1].iloc[[0, 5]]
    g1, g2, g3, g4 = (genuine.iloc[i] for i in range(4))
    f1, f2 = frauds.iloc[0], frauds.iloc[1]
    other = frame.iloc[0]
    mismatched = _alert(g4, customer="99999999")
    unknown = _alert(other, tx_id="no-such-transaction")
    store = CaseStore(url)
    try:
        store.add_alerts(
            [_alert(t) for t in (g1, g2, g3, f1, f2)] + [mismatched, unknown], now_s=T0
        )
        decisions = [
            (g1, Outcome.FRAUD),
            (f1, Outcome.LEGITIMATE),
            (f2, Outcome.FRAUD),
            (g2, Outcome.FRAUD),
            (g3, Outcome.ESCALATE),
        ]
        for n, (tx, outcome) in enumerate(decisions):
            tx_id = str(tx["TRANSACTION_ID"])
            assert store.claim(tx_id, "ann", escalated_too=False)
            store.record_verdict(tx_id, outcome, "seen", "ann", now_s=T0 + 10 * (n + 1))
        for tx_id, outcome in (
            (mismatched.transaction_id, Outcome.FRAUD),
            (unknown.transaction_id, Outcome.LEGITIMATE),
        ):
            assert store.claim(tx_id, "bob", escalated_too=False)
            store.record_verdict(tx_id, outcome, "", "bob", now_s=T0 + 100)
        store.correct_verdict(
            str(g2["TRANSACTION_ID"]), Outcome.LEGITIMATE, "own purchase", "sue",
            now_s=CORRECTED_AT,
        )  # fmt: skip
    finally:
        store.close()

    def row(tx: pd.Series, fraud: int) -> tuple[str, tuple[str, str, int]]:
        return str(tx["TRANSACTION_ID"]), (str(tx["CUSTOMER_ID"]), str(tx["TERMINAL_ID"]), fraud)

    expected = dict([row(g1, 1), row(f1, 0), row(f2, 1), row(g2, 0)])
    expected[mismatched.transaction_id] = (mismatched.customer_id, mismatched.terminal_id, 1)
    expected[unknown.transaction_id] = (unknown.customer_id, unknown.terminal_id, 0)
    return Verdicts(
        expected=expected,
        flipped_to_fraud=1,
        flipped_to_genuine=1,
        confirmed_fraud=1,
        corrected=1,
        escalated=1,
        mismatched=1,
        unknown=unknown.transaction_id,
    )


def _export(url: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["labels", "export", *args], env={URL_VARIABLE: url})
    return result.exit_code, result.output


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == LABEL_FILE_COLUMNS
        return list(reader)


def test_the_file_holds_each_transactions_latest_verdict(
    store_url: str, frame: pd.DataFrame, tmp_path: Path
) -> None:
    verdicts = _record_verdicts(store_url, frame)
    out = tmp_path / "labels.csv"
    code, output = _export(store_url, "--out", str(out))
    assert code == 0, output
    assert "wrote 6 labels (3 fraud, 3 legitimate; 1 corrected" in output
    rows = _read_csv(out)
    got = {
        r["TRANSACTION_ID"]: (r["CUSTOMER_ID"], r["TERMINAL_ID"], int(r["TX_FRAUD"])) for r in rows
    }
    # the correction wins, the escalation is no label, the undecided case is not there
    assert got == verdicts.expected
    times = dict(zip(frame["TRANSACTION_ID"].astype(str), frame["TX_DATETIME"], strict=True))
    for r in rows:
        if r["TRANSACTION_ID"] in times:
            at = times[r["TRANSACTION_ID"]]
            assert r["TX_DATETIME"] == iso_utc_millis(at.timestamp())
    corrected = [r for r in rows if r["REPORTED_AT"] == iso_utc_millis(CORRECTED_AT)]
    assert len(corrected) == 1 and corrected[0]["TX_FRAUD"] == "0"
    assert [r["TX_DATETIME"] for r in rows] == sorted(r["TX_DATETIME"] for r in rows)
    assert "ann" not in out.read_text() and "sue" not in out.read_text()  # no analyst names

    # Parquet: the same rows, with UTC timestamps.
    parquet = tmp_path / "labels.parquet"
    code, output = _export(store_url, "--out", str(parquet))
    assert code == 0, output
    table = pq.read_table(parquet)
    assert tuple(table.column_names) == LABEL_FILE_COLUMNS
    assert str(table.schema.field(LabelColumn.TX_DATETIME).type) == "timestamp[ms, tz=UTC]"
    as_read = table.to_pandas()
    assert as_read[LabelColumn.TRANSACTION_ID].tolist() == [r["TRANSACTION_ID"] for r in rows]
    assert as_read[LabelColumn.TX_FRAUD].tolist() == [int(r["TX_FRAUD"]) for r in rows]
    reported = [iso_utc_millis(t.timestamp()) for t in as_read[LabelColumn.REPORTED_AT]]
    assert reported == [r["REPORTED_AT"] for r in rows]

    # --since: only the transactions whose latest verdict is that recent (the correction).
    since = datetime.fromtimestamp(CORRECTED_AT - 60, UTC).isoformat()
    recent = tmp_path / "recent.csv"
    code, output = _export(store_url, "--out", str(recent), "--since", since)
    assert code == 0, output
    assert [r["REPORTED_AT"] for r in _read_csv(recent)] == [iso_utc_millis(CORRECTED_AT)]


def test_an_empty_store_writes_no_file(store_url: str, tmp_path: Path) -> None:
    out = tmp_path / "labels.parquet"
    code, output = _export(store_url, "--out", str(out))
    assert code == 1, output
    assert "nothing to export" in output and "not written" in output
    assert not out.exists()
    password = urlsplit(store_url).password
    assert password is None or password not in output


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_that_is_not_the_consoles_is_refused(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = _new_database(kind, request, tmp_path)
    if kind == "sqlite":  # a missing file is not created
        code, output = _export(url, "--out", str(tmp_path / "l.csv"))
        assert code == 2 and "no case store at" in output
        assert not (tmp_path / "cases.db").exists()
        (tmp_path / "cases.db").write_bytes(b"")  # a database without the console's tables
    code, output = _export(url, "--out", str(tmp_path / "l.csv"))
    assert code == 2, output
    assert URL_VARIABLE in output and "console's database" in output
    assert not (tmp_path / "l.csv").exists()


def test_bad_options_are_refused_before_reading(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'absent.db'}"
    for args, message in (
        (["--out", str(tmp_path / "l.txt")], "end it in .parquet or .csv"),
        (["--out", str(tmp_path / "l.csv"), "--format", "parquet"], "make them agree"),
        (["--out", str(tmp_path / "l.csv"), "--format", "xlsx"], "parquet or csv"),
        (["--out", str(tmp_path / "l.csv"), "--since", "last week"], "--since must be"),
    ):
        code, output = _export(url, *args)
        assert code == 2 and message in output, (args, output)


def test_parquet_without_pyarrow_names_the_extra(
    frame: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _create_schema(f"sqlite:///{tmp_path / 'cases.db'}")
    _record_verdicts(url, frame)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    code, output = _export(url, "--out", str(tmp_path / "l.parquet"))
    assert code == 2, output
    assert 'pip install "fraudstream[tools]"' in output and "--format csv" in output
    assert not [p for p in tmp_path.iterdir() if "l.parquet" in p.name]  # not even a partial
    monkeypatch.delitem(sys.modules, "pyarrow")
    assert _export(url, "--out", str(tmp_path / "l.csv"))[0] == 0


def test_the_label_columns_are_the_transactions_tables() -> None:
    # One name per thing: a label names its transaction with the transactions table's
    # columns; only when the verdict was given is the label file's own.
    assert set(LABEL_FILE_COLUMNS) - set(TRANSACTION_COLUMNS) == {LabelColumn.REPORTED_AT}


@pytest.fixture(scope="module")
def exported(
    frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Verdicts]:
    """A label file exported from a SQLite store with the verdicts of _record_verdicts."""
    folder = tmp_path_factory.mktemp("exported")
    url = _create_schema(f"sqlite:///{folder / 'cases.db'}")
    verdicts = _record_verdicts(url, frame)
    out = folder / "labels.parquet"
    code, output = _export(url, "--out", str(out))
    assert code == 0, output
    return out, verdicts


def test_labels_override_tx_fraud_and_mismatches_are_refused(
    frame: pd.DataFrame, exported: tuple[Path, Verdicts], tmp_path: Path
) -> None:
    path, verdicts = exported
    before = frame.copy()
    labelled, merge = apply_label_files(frame, [path])
    pd.testing.assert_frame_equal(frame, before)  # the input is not changed
    assert (merge.read, merge.applied, merge.unknown, merge.mismatched) == (6, 4, 1, 1)
    assert merge.changed == verdicts.flipped_to_fraud + verdicts.flipped_to_genuine
    assert merge.summary().startswith(
        "4 labels applied, 2 changed TX_FRAUD, 1 unknown, 1 mismatched"
    )
    by_id = labelled.set_index(labelled["TRANSACTION_ID"].astype(str))["TX_FRAUD"]
    old = before.set_index(before["TRANSACTION_ID"].astype(str))["TX_FRAUD"]
    mismatched = [
        tx for tx, (customer, _, _) in verdicts.expected.items() if customer == "99999999"
    ]
    for tx, (_, _, fraud) in verdicts.expected.items():
        if tx == verdicts.unknown:
            continue
        if tx in mismatched:  # refused: the file's own TX_FRAUD stays
            assert by_id[tx] == old[tx] == 0
        else:
            assert by_id[tx] == fraud
    changed = (labelled["TX_FRAUD"] != before["TX_FRAUD"]).sum()
    assert changed == merge.changed
    assert labelled["TX_FRAUD"].dtype == before["TX_FRAUD"].dtype

    # A second file: a later verdict wins over the export's, an older one does not.
    flipped = next(tx for tx, v in verdicts.expected.items() if v[2] == 1 and tx not in mismatched)
    genuine_tx = labelled[labelled["TRANSACTION_ID"].astype(str) == flipped].iloc[0]
    extra = tmp_path / "late.csv"
    extra.write_text(
        ",".join(LABEL_FILE_COLUMNS) + "\n"
        + f"{flipped},{genuine_tx['CUSTOMER_ID']},{genuine_tx['TERMINAL_ID']},"
        f"{iso_utc_millis(genuine_tx['TX_DATETIME'].timestamp())},0,{iso_utc_millis(T0 + 86400)}\n"
        + f"{flipped},{genuine_tx['CUSTOMER_ID']},{genuine_tx['TERMINAL_ID']},"
        f"{iso_utc_millis(genuine_tx['TX_DATETIME'].timestamp())},1,{iso_utc_millis(T0)}\n"
    )  # fmt: skip
    again, merge2 = apply_label_files(frame, [path, extra])
    assert again.loc[again["TRANSACTION_ID"].astype(str) == flipped, "TX_FRAUD"].item() == 0
    assert (merge2.read, merge2.applied, merge2.superseded) == (8, 4, 2)
    assert merge2.read == merge2.applied + merge2.superseded + merge2.unknown + merge2.mismatched


@pytest.mark.slow
def test_train_reads_the_label_file(
    data: Path, exported: tuple[Path, Verdicts], tmp_path: Path
) -> None:
    path, _ = exported
    out = tmp_path / "model"
    train = [
        "train", "--data", str(data), "--out", str(out), "--labels", str(path),
        "--train-days", "7", "--test-days", "1", "--epochs", "1", "--patience", "1",
        "--sequence-length", "2", "--hidden-size", "8", "--threads", "1",
    ]  # fmt: skip
    result = runner.invoke(app, train, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "4 labels applied, 2 changed TX_FRAUD, 1 unknown, 1 mismatched (refused)" in (
        result.output
    )
    card = json.loads((out / "model_card.json").read_text())
    recorded = card["training"]["labels"]
    assert (recorded["applied"], recorded["changed"], recorded["mismatched"]) == (4, 2, 1)
    assert recorded["files"][0]["path"] == str(path)
    assert f"--labels {path}" in card["training"]["command"]
