"""The label file: analysts' verdicts from the case store, as training labels.

``fraudstream labels export --out FILE`` writes one row per decided transaction with its
latest fraud or legitimate verdict (a supervisor's correction wins over the verdict it
corrects; an escalation is no label); ``fraudstream train --labels FILE`` lets those rows
override the ``TX_FRAUD`` column of its transactions file
(:func:`training.dataset.apply_label_files`).

The file's columns are defined once, here (:class:`LabelColumn`), and both sides import
them. They live in the serving package rather than in ``training/`` because the console
writes the file without the training stack (``training`` imports ``stream_app``, never the
reverse); the names of the transaction columns are those of a transactions table
(``training.transactions.TRANSACTION_COLUMNS``), which
``tests/stream_app/console/test_export.py`` holds them to.

The analyst's name is left out on purpose: a training file is copied to notebooks and
model cards, and who decided is personal data that no model needs; it stays in the
console's append-only verdict trail, which already answers "who said so, when".

CSV needs nothing beyond the standard library; Parquet needs pyarrow (the ``tools``,
``demo`` or ``train`` extra), imported only when asked for.
"""

from __future__ import annotations

import csv
import enum
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer

from stream_app.errors import FraudStreamError

if TYPE_CHECKING:  # annotations only: the store loads when the command runs
    from stream_app.records import Label


class LabelColumn(enum.StrEnum):
    """The columns of a label file, in order (CSV header and Parquet schema alike).

    Times are UTC: ISO-8601 with milliseconds and ``Z`` in CSV, ``timestamp[ms, UTC]`` in
    Parquet. Identifiers are text, as on the labels topic, and match a transactions
    file's integer ids by their decimal text, as the worker matches them.
    """

    TRANSACTION_ID = "TRANSACTION_ID"
    CUSTOMER_ID = "CUSTOMER_ID"
    TERMINAL_ID = "TERMINAL_ID"
    TX_DATETIME = "TX_DATETIME"  # the labelled transaction's event time
    TX_FRAUD = "TX_FRAUD"  # 1 fraud, 0 legitimate
    REPORTED_AT = "REPORTED_AT"  # when the verdict was given: the latest wins


LABEL_FILE_COLUMNS: Final = tuple(column.value for column in LabelColumn)
FORMATS: Final = ("parquet", "csv")
# Nothing to export is not a mistake to fix (that is exit code 2, as for a bad setting),
# but a script that trains on the file must not go on: 1, as grep says "no match".
EXIT_NOTHING_TO_EXPORT: Final = 1
_PARQUET_EXTRA: Final = "tools"


class LabelExportError(FraudStreamError):
    """An export that cannot be done as asked; the message says what to change."""


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What :func:`export_labels` wrote."""

    path: Path
    file_format: str
    rows: int
    frauds: int
    corrected: int

    def describe(self) -> str:
        """One line for the terminal."""
        return (
            f"wrote {self.rows} labels ({self.frauds} fraud, {self.rows - self.frauds} "
            f"legitimate; {self.corrected} corrected since their first verdict) to "
            f"{self.path} ({self.file_format})"
        )


def latest_labels(labels: Iterable[Label], since: datetime | None = None) -> list[Label]:
    """Each transaction's latest label, in event-time order.

    Args:
        labels: Labels in the order they were given (:meth:`CaseStore.labelled_verdicts`);
            of two with the same ``reported_at`` the later one in this order wins.
        since: Keep only transactions whose latest verdict was given at or after it.

    Returns:
        One label per transaction, sorted by event time, then transaction id.
    """
    latest: dict[str, Label] = {}
    for label in labels:
        held = latest.get(label.transaction_id)
        if held is None or label.reported_at >= held.reported_at:
            latest[label.transaction_id] = label
    kept = [lb for lb in latest.values() if since is None or lb.reported_at >= since]
    return sorted(kept, key=lambda lb: (lb.event_time, lb.transaction_id))


def label_file_format(path: Path, file_format: str | None) -> str:
    """The format to write: ``file_format`` if given, else the one ``path``'s extension names.

    Raises:
        LabelExportError: an unknown format, an extension naming the other format, or
            neither telling.
    """
    suffix = path.suffix.lower().removeprefix(".")
    if file_format is not None:
        if file_format not in FORMATS:
            raise LabelExportError(f"--format must be parquet or csv, got {file_format!r}")
        if suffix in FORMATS and suffix != file_format:
            raise LabelExportError(
                f"--out {path} names a .{suffix} file but --format is {file_format}: "
                "make them agree"
            )
        return file_format
    if suffix in FORMATS:
        return suffix
    raise LabelExportError(
        f"cannot tell the format of {path}: end it in .parquet or .csv, or give --format"
    )


def write_label_file(labels: Sequence[Label], path: Path, file_format: str) -> None:
    """Write ``labels`` as a label file, atomically (a failed write leaves no partial file).

    Raises:
        LabelExportError: Parquet asked for without pyarrow installed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if file_format == "parquet":
            _write_parquet(labels, partial)
        else:
            _write_csv(labels, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _ms(moment: datetime) -> datetime:
    """The time in UTC, cut to milliseconds (the file's resolution, as on the topics)."""
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _iso(moment: datetime) -> str:
    return _ms(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _write_csv(labels: Sequence[Label], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_FILE_COLUMNS)
        for lb in labels:
            writer.writerow(
                (
                    lb.transaction_id,
                    lb.customer_id,
                    lb.terminal_id,
                    _iso(lb.event_time),
                    int(lb.is_fraud),
                    _iso(lb.reported_at),
                )
            )


def _write_parquet(labels: Sequence[Label], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LabelExportError(
            f"--format parquet needs pyarrow, from the {_PARQUET_EXTRA!r} extra: "
            f'pip install "fraudstream[{_PARQUET_EXTRA}]" (or write --format csv)'
        ) from None
    utc_ms = pa.timestamp("ms", tz="UTC")
    columns = {
        LabelColumn.TRANSACTION_ID: pa.array([lb.transaction_id for lb in labels], pa.string()),
        LabelColumn.CUSTOMER_ID: pa.array([lb.customer_id for lb in labels], pa.string()),
        LabelColumn.TERMINAL_ID: pa.array([lb.terminal_id for lb in labels], pa.string()),
        LabelColumn.TX_DATETIME: pa.array([_ms(lb.event_time) for lb in labels], utc_ms),
        LabelColumn.TX_FRAUD: pa.array([int(lb.is_fraud) for lb in labels], pa.int8()),
        LabelColumn.REPORTED_AT: pa.array([_ms(lb.reported_at) for lb in labels], utc_ms),
    }
    table = pa.table({str(name): values for name, values in columns.items()})
    assert tuple(table.column_names) == LABEL_FILE_COLUMNS
    pq.write_table(table, path)


def parse_since(text: str) -> datetime:
    """``--since``: an ISO date (midnight UTC) or an ISO date-time (naive means UTC).

    Raises:
        LabelExportError: not ISO-8601.

    >>> parse_since("2026-01-02").isoformat()
    '2026-01-02T00:00:00+00:00'
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise LabelExportError(
            f"--since must be an ISO date such as 2026-01-31 (or date-time), got {text!r}"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def export_labels(
    database_url: str,
    out: Path,
    *,
    file_format: str | None = None,
    since: datetime | None = None,
) -> ExportSummary | None:
    """Write the store's verdicts as a label file; None (and no file) when there is none.

    The store is only read: no table is created, so a read-only database user will do,
    and a URL naming the wrong database is reported rather than filled with empty tables.

    Raises:
        LabelExportError: the format, the database file or its tables are not as needed.
        StoreError: the database cannot be reached.
    """
    from stream_app.console.store import CaseStore

    chosen = label_file_format(out, file_format)
    if database_url.startswith("sqlite:///"):
        db_file = Path(database_url.removeprefix("sqlite:///"))
        if not db_file.is_file():  # sqlite3 would create an empty one
            raise LabelExportError(
                f"no case store at {db_file}: set FRAUDSTREAM_CONSOLE_DATABASE_URL to the "
                "console's database"
            )
    store = CaseStore(database_url)
    try:
        given = store.labelled_verdicts()
    except _database_errors(store.dialect) as exc:
        raise LabelExportError(
            f"cannot read verdicts from the case store ({type(exc).__name__}: "
            f"{(str(exc).strip().splitlines() or [''])[0]}): is "
            "FRAUDSTREAM_CONSOLE_DATABASE_URL the console's database?"
        ) from None
    finally:
        store.close()
    labels = latest_labels(given, since)
    if not labels:
        return None
    write_label_file(labels, out, chosen)
    counts: dict[str, int] = {}
    for label in given:
        counts[label.transaction_id] = counts.get(label.transaction_id, 0) + 1
    return ExportSummary(
        path=out,
        file_format=chosen,
        rows=len(labels),
        frauds=sum(lb.is_fraud for lb in labels),
        corrected=sum(counts[lb.transaction_id] > 1 for lb in labels),
    )


def _database_errors(dialect: str) -> tuple[type[Exception], ...]:
    """The driver's errors for a missing table or a refused query."""
    if dialect == "postgresql":
        import psycopg

        return (psycopg.Error,)
    return (sqlite3.Error,)


labels_app = typer.Typer(
    name="labels",
    help="Analysts' verdicts as training labels.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@labels_app.command("export", short_help="Write the verdicts as a training label file.")
def export_command(
    out: Annotated[
        Path,
        typer.Option(help="Label file to write (.parquet or .csv).", dir_okay=False),
    ],
    since: Annotated[
        str | None,
        typer.Option(
            help="Only transactions whose latest verdict was given on or after this "
            "ISO date (UTC) or date-time."
        ),
    ] = None,
    file_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="parquet or csv; default: the --out extension. Parquet needs pyarrow.",
        ),
    ] = None,
) -> None:
    """Write the console's verdicts as a label file for fraudstream train --labels.

    One row per transaction with its latest fraud or legitimate verdict (a correction
    wins; escalations are no labels): TRANSACTION_ID, CUSTOMER_ID, TERMINAL_ID,
    TX_DATETIME, TX_FRAUD, REPORTED_AT. The case store is FRAUDSTREAM_CONSOLE_DATABASE_URL.
    With no verdict to export, no file is written and the exit code is 1.
    """
    from stream_app.cli import fail
    from stream_app.console.settings import load_console_settings
    from stream_app.console.store import StoreError
    from stream_app.errors import ConfigError

    try:
        settings = load_console_settings()
        since_at = None if since is None else parse_since(since)
        summary = export_labels(
            settings.database_url.get_secret_value(),
            out,
            file_format=file_format,
            since=since_at,
        )
    except ImportError as exc:  # psycopg, for a PostgreSQL store
        fail(f"the case store needs its extra: pip install 'fraudstream[console]' ({exc.name})")
    except (ConfigError, StoreError, LabelExportError) as exc:
        fail(str(exc))
    if summary is None:
        when = "" if since is None else f" given since {since}"
        typer.echo(
            f"nothing to export: no fraud or legitimate verdict{when} in the case store "
            f"{settings.database_display_url}; {out} not written",
            err=True,
        )
        raise typer.Exit(code=EXIT_NOTHING_TO_EXPORT)
    typer.echo(summary.describe())
