"""Transactions tables on disk, and their conversion to what features and Kafka take.

A table has the :data:`TRANSACTION_COLUMNS` of the simulator (the Fraud Detection
Handbook's layout); ``TX_DATETIME`` is naive and means UTC. This module is the one place
that turns a table row into epoch milliseconds and into a ``TransactionEvent`` payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from stream_app.errors import ConfigError

_SUFFIXES = (".parquet", ".csv")

TRANSACTION_COLUMNS: tuple[str, ...] = (
    "TRANSACTION_ID",
    "TX_DATETIME",
    "CUSTOMER_ID",
    "TERMINAL_ID",
    "TX_AMOUNT",
    "TX_TIME_SECONDS",
    "TX_TIME_DAYS",
    "TX_FRAUD",
    "TX_FRAUD_SCENARIO",
)
"""The columns of a transactions table, in order."""

TRANSACTION_DTYPES: Mapping[str, str] = {
    "TRANSACTION_ID": "int64",
    "TX_DATETIME": "datetime64[ns]",  # naive, meaning UTC
    "CUSTOMER_ID": "int64",
    "TERMINAL_ID": "int64",
    "TX_AMOUNT": "float64",
    "TX_TIME_SECONDS": "int64",
    "TX_TIME_DAYS": "int64",
    "TX_FRAUD": "int8",
    "TX_FRAUD_SCENARIO": "int8",
}
"""The dtype of each column, as :func:`simulate` makes it and :func:`read_transactions` reads it."""


def output_format(path: Path) -> str:
    """The table format a path's extension names: ``"parquet"`` or ``"csv"`` (any case).

    Raises:
        ConfigError: any other extension.

    >>> output_format(Path("data/tx.CSV"))
    'csv'
    """
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ConfigError(f"cannot tell the format of {path}: use a .parquet or .csv extension")
    return suffix.removeprefix(".")


def write_transactions(df: pd.DataFrame, path: Path) -> None:
    """Write a transactions table as Parquet or CSV, chosen by the file extension.

    Parent folders are created as needed.

    Raises:
        ConfigError: the extension is neither ``.parquet`` nor ``.csv``, or a column of
            :data:`TRANSACTION_COLUMNS` is missing.
    """
    file_format = output_format(path)
    _check_columns(df, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)


def read_transactions(path: Path) -> pd.DataFrame:
    """Read a transactions table written by :func:`write_transactions`.

    Returns:
        The table with the columns of :data:`TRANSACTION_COLUMNS` first, in order and with
        the dtypes of :data:`TRANSACTION_DTYPES`, followed by any other column of the file.

    Raises:
        ConfigError: bad extension, missing file, missing columns or unreadable values.
    """
    file_format = output_format(path)
    if not path.is_file():
        raise ConfigError(f"transactions file {path} does not exist")
    df = pd.read_parquet(path) if file_format == "parquet" else pd.read_csv(path)
    _check_columns(df, path)
    extra = [column for column in df.columns if column not in TRANSACTION_DTYPES]
    try:
        df["TX_DATETIME"] = pd.to_datetime(df["TX_DATETIME"])
        typed = df.astype(dict(TRANSACTION_DTYPES))
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"transactions file {path} holds values of the wrong type: {exc}"
        ) from exc
    return typed[[*TRANSACTION_COLUMNS, *extra]]


def _check_columns(df: pd.DataFrame, path: Path) -> None:
    missing = [column for column in TRANSACTION_COLUMNS if column not in df.columns]
    if missing:
        raise ConfigError(f"transactions table {path} lacks the columns {', '.join(missing)}")


@dataclass(frozen=True)
class TransactionArrays:
    """The columns features need, as numpy arrays in the table's row order."""

    transaction_ids: npt.NDArray[np.int64]
    customer_ids: npt.NDArray[np.int64]
    terminal_ids: npt.NDArray[np.int64]
    times_ms: npt.NDArray[np.int64]
    amounts: npt.NDArray[np.float64]
    is_fraud: npt.NDArray[np.int64]


def epoch_ms(datetimes: pd.Series) -> npt.NDArray[np.int64]:
    """Naive-UTC datetimes as integer epoch milliseconds."""
    values = pd.to_datetime(datetimes).to_numpy(dtype="datetime64[ms]")
    return values.astype(np.int64)


def to_arrays(df: pd.DataFrame) -> TransactionArrays:
    """Columns of a transactions table as arrays (row order kept)."""
    return TransactionArrays(
        transaction_ids=df["TRANSACTION_ID"].to_numpy(dtype=np.int64),
        customer_ids=df["CUSTOMER_ID"].to_numpy(dtype=np.int64),
        terminal_ids=df["TERMINAL_ID"].to_numpy(dtype=np.int64),
        times_ms=epoch_ms(df["TX_DATETIME"]),
        amounts=df["TX_AMOUNT"].to_numpy(dtype=np.float64),
        is_fraud=df["TX_FRAUD"].to_numpy(dtype=np.int64),
    )
