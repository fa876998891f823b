"""Synthetic card transactions with labelled fraud, after the Fraud Detection Handbook.

The generative process is the one of Le Borgne et al., *Reproducible Machine Learning for
Credit Card Fraud Detection – Practical Handbook*, section 3.2 "Transaction data simulator",
re-written with whole-array numpy operations instead of a per-customer pandas loop:

1. Customers get a home ``(x, y) ~ U(0, 100)²``, a mean amount ``~ U(5, 100)`` (standard
   deviation half of it) and a mean number of transactions per day ``~ U(0, 4)``.
2. Terminals get a location ``~ U(0, 100)²``; a customer uses every terminal at Euclidean
   distance strictly below ``radius``. A customer with no terminal in range never transacts.
3. Per customer per day: ``Poisson(mean per day)`` draws; each draw gets a time of day
   ``int(N(43 200, 20 000))`` seconds, kept only when ``0 < t < 86 400`` (the reference's
   exact bounds); an amount ``N(mean, std)``, a negative draw replaced by ``U(0, 2 mean)``,
   rounded to cents; and a terminal drawn uniformly from the customer's terminals.
4. Frauds, each scenario overriding the label of the previous ones (``TX_FRAUD_SCENARIO``
   holds the last scenario that marked a transaction, 0 for genuine):

   1. every amount strictly above ``amount_threshold`` is fraud;
   2. on each day ``d`` in ``0 .. n_days - 2`` (the reference loops over
      ``range(max day)``), ``compromised_terminals_per_day`` distinct terminals are drawn;
      all their transactions with ``d <= TX_TIME_DAYS < d + terminal_compromise_days`` are
      fraud;
   3. on each such day, ``compromised_customers_per_day`` distinct customers are drawn; of
      the transactions of those customers with ``d <= TX_TIME_DAYS < d +
      customer_compromise_days`` (pooled over the customers), a random sample without
      replacement of ``int(count * customer_fraud_fraction)`` has its amount multiplied by
      ``customer_fraud_amount_factor`` and is fraud. Days are processed in order, so a
      transaction drawn on two overlapping days is multiplied twice, as in the reference.

Deviations from the reference, all deliberate:

* One ``numpy.random.Generator`` seeded by ``seed`` drives everything, where the reference
  reseeds the legacy global generator per customer and per day: the figures match in
  distribution, not draw for draw.
* Scenario 3 rounds the multiplied amount back to cents, so every amount has two decimals.
* Scenario-2/3 days come from ``n_days`` rather than from the largest day seen in the
  data, so the fraud draws never depend on whether the last day happens to be empty.

>>> df = simulate(SimulatorConfig(n_customers=20, n_terminals=50, n_days=5, radius=30))
>>> list(df.columns) == list(TRANSACTION_COLUMNS)
True
>>> bool((df["TRANSACTION_ID"] == range(len(df))).all())
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from stream_app.errors import ConfigError
from training.transactions import (
    TRANSACTION_COLUMNS,
    TRANSACTION_DTYPES,
)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.int8]

STAGES: tuple[str, ...] = ("profiles", "terminals in range", "transactions", "frauds")
"""The stages :func:`simulate` reports to its ``progress`` callback, in order."""

FRAUD_SCENARIOS: tuple[int, ...] = (1, 2, 3)
"""The values ``TX_FRAUD_SCENARIO`` takes on a fraud (0 marks a genuine transaction)."""

_SIDE = 100.0  # customers and terminals live in the square [0, 100)²
_DAY_SECONDS = 86_400
_TIME_OF_DAY_MEAN = 43_200.0  # noon: most transactions happen in the day
_TIME_OF_DAY_STD = 20_000.0


@dataclass(frozen=True)
class SimulatorConfig:
    """Every parameter of the simulator; the defaults are the Handbook's dataset.

    Raises:
        ConfigError: on construction, when a value is out of range.
    """

    n_customers: int = 5000
    n_terminals: int = 10000
    n_days: int = 183
    start_date: str = "2018-04-01"
    radius: float = 5.0
    seed: int = 1
    # fraud scenarios
    amount_threshold: float = 220.0
    compromised_terminals_per_day: int = 2
    terminal_compromise_days: int = 28
    compromised_customers_per_day: int = 3
    customer_compromise_days: int = 14
    customer_fraud_fraction: float = 1 / 3
    customer_fraud_amount_factor: float = 5.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("n_customers", "n_terminals", "n_days"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "seed",
            "compromised_terminals_per_day",
            "terminal_compromise_days",
            "compromised_customers_per_day",
            "customer_compromise_days",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.compromised_terminals_per_day > self.n_terminals:
            problems.append(
                f"compromised_terminals_per_day ({self.compromised_terminals_per_day}) "
                f"exceeds n_terminals ({self.n_terminals})"
            )
        if self.compromised_customers_per_day > self.n_customers:
            problems.append(
                f"compromised_customers_per_day ({self.compromised_customers_per_day}) "
                f"exceeds n_customers ({self.n_customers})"
            )
        if not (math.isfinite(self.radius) and self.radius > 0):
            problems.append(f"radius must be a positive number, got {self.radius}")
        if math.isnan(self.amount_threshold):
            problems.append("amount_threshold must be a number, got NaN")
        if not 0.0 <= self.customer_fraud_fraction <= 1.0:
            problems.append(
                f"customer_fraud_fraction must lie in [0, 1], got {self.customer_fraud_fraction}"
            )
        factor = self.customer_fraud_amount_factor
        if not (math.isfinite(factor) and factor >= 0):
            problems.append(f"customer_fraud_amount_factor must be >= 0, got {factor}")
        try:
            start = pd.Timestamp(self.start_date)
        except ValueError:
            problems.append(
                f"start_date must be a date such as 2018-04-01, got {self.start_date!r}"
            )
        else:
            if start.tzinfo is not None:
                problems.append(
                    f"start_date must carry no time zone (UTC), got {self.start_date!r}"
                )
        if problems:
            raise ConfigError("invalid simulator settings: " + "; ".join(problems))


@dataclass(frozen=True)
class SimulationSummary:
    """Headline figures of a transactions table.

    ``scenario_counts`` maps each fraud scenario (1, 2, 3) to the number of transactions
    whose final label is that scenario.
    """

    rows: int
    frauds: int
    fraud_rate: float
    scenario_counts: Mapping[int, int]


@dataclass(frozen=True)
class _Customers:
    x: FloatArray
    y: FloatArray
    mean_amount: FloatArray
    mean_tx_per_day: FloatArray


@dataclass(frozen=True)
class _Transactions:
    """Transactions in generation order: grouped by customer, days ascending within one."""

    customer: IntArray
    terminal: IntArray
    day: IntArray
    seconds: IntArray
    amount: FloatArray


def simulate(
    config: SimulatorConfig, progress: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """Generate a labelled transactions table.

    Args:
        config: the simulator's parameters; the same config always gives the same table.
        progress: called with the name of each stage of :data:`STAGES` as it starts.

    Returns:
        A frame with the columns :data:`TRANSACTION_COLUMNS` (dtypes
        :data:`TRANSACTION_DTYPES`), rows sorted by ``(TX_TIME_SECONDS, CUSTOMER_ID)`` and
        ``TRANSACTION_ID`` numbering them from 0 in that order.
    """
    report = progress if progress is not None else _ignore
    rng = np.random.default_rng(config.seed)

    report(STAGES[0])
    customers = _customer_profiles(config.n_customers, rng)
    terminal_x = rng.uniform(0.0, _SIDE, config.n_terminals)
    terminal_y = rng.uniform(0.0, _SIDE, config.n_terminals)

    report(STAGES[1])
    offsets, terminal_ids = _terminals_in_range(
        customers.x, customers.y, terminal_x, terminal_y, config.radius
    )

    report(STAGES[2])
    tx = _transactions(config.n_days, customers, offsets, terminal_ids, rng)

    report(STAGES[3])
    amount, fraud, scenario = _add_frauds(config, tx, rng)

    # lexsort is stable, so equal (seconds, customer) pairs keep generation order and the
    # table stays deterministic for a seed.
    order = np.lexsort((tx.customer, tx.seconds))
    seconds = tx.seconds[order]
    start_ns = pd.Timestamp(config.start_date).as_unit("ns").value
    datetimes = (start_ns + seconds * 1_000_000_000).astype("datetime64[ns]")
    frame = pd.DataFrame(
        {
            "TRANSACTION_ID": np.arange(order.size, dtype=np.int64),
            "TX_DATETIME": datetimes,
            "CUSTOMER_ID": tx.customer[order],
            "TERMINAL_ID": tx.terminal[order],
            "TX_AMOUNT": amount[order],
            "TX_TIME_SECONDS": seconds,
            "TX_TIME_DAYS": tx.day[order],
            "TX_FRAUD": fraud[order],
            "TX_FRAUD_SCENARIO": scenario[order],
        },
        columns=list(TRANSACTION_COLUMNS),
    )
    return frame.astype(dict(TRANSACTION_DTYPES))


def customers_in_region(config: SimulatorConfig, share: float) -> IntArray:
    """The customers living in the corner square of the map that holds ``share`` of it.

    A part of the full population at the Handbook's density: its customers keep their
    terminals, and the fraud scenarios (drawn over the whole map, so about ``share`` of
    them fall in the region) keep their rates. A small population simulated on its own
    would not: the scenarios draw a fixed number of terminals and customers a day, so 300
    customers get ~10x the Handbook's fraud rate. Same ``config``, same customers: these
    are the first draws :func:`simulate` makes.

    >>> config = SimulatorConfig(n_customers=1000, n_terminals=10, n_days=1)
    >>> 40 < len(customers_in_region(config, 0.06)) < 80
    True
    """
    if not 0 < share <= 1:
        raise ConfigError(f"share must be in (0, 1], got {share}")
    customers = _customer_profiles(config.n_customers, np.random.default_rng(config.seed))
    side = _SIDE * math.sqrt(share)
    return np.flatnonzero((customers.x < side) & (customers.y < side)).astype(np.int64)


def summarise(df: pd.DataFrame) -> SimulationSummary:
    """Count rows, frauds and frauds per scenario of a transactions table.

    >>> frame = pd.DataFrame({"TX_FRAUD": [0, 1, 1, 0], "TX_FRAUD_SCENARIO": [0, 2, 3, 0]})
    >>> summarise(frame)
    SimulationSummary(rows=4, frauds=2, fraud_rate=0.5, scenario_counts={1: 0, 2: 1, 3: 1})
    """
    rows = len(df)
    frauds = int(df["TX_FRAUD"].sum())
    per_scenario = df["TX_FRAUD_SCENARIO"].value_counts()
    counts = {scenario: int(per_scenario.get(scenario, 0)) for scenario in FRAUD_SCENARIOS}
    return SimulationSummary(
        rows=rows,
        frauds=frauds,
        fraud_rate=frauds / rows if rows else 0.0,
        scenario_counts=counts,
    )


def _ignore(stage: str) -> None:
    """Progress callback that does nothing."""


def _customer_profiles(n_customers: int, rng: np.random.Generator) -> _Customers:
    return _Customers(
        x=rng.uniform(0.0, _SIDE, n_customers),
        y=rng.uniform(0.0, _SIDE, n_customers),
        mean_amount=rng.uniform(5.0, 100.0, n_customers),
        mean_tx_per_day=rng.uniform(0.0, 4.0, n_customers),
    )


def _terminals_in_range(
    customer_x: FloatArray,
    customer_y: FloatArray,
    terminal_x: FloatArray,
    terminal_y: FloatArray,
    radius: float,
) -> tuple[IntArray, IntArray]:
    """Terminals at distance < ``radius`` of each customer, as a CSR adjacency.

    Returns:
        ``(offsets, terminal_ids)``: customer ``c`` uses
        ``terminal_ids[offsets[c]:offsets[c + 1]]``, in ascending id order.
    """
    # Bucket terminals into square cells of side `radius`: a terminal within `radius` of a
    # customer lies in the customer's cell or one of its 8 neighbours, so each customer is
    # measured against ~9 cells' worth of terminals instead of all of them.
    n_cells = max(1, math.ceil(_SIDE / radius))

    def cell_coordinates(values: FloatArray) -> IntArray:
        return np.clip(np.floor(values / radius), 0, n_cells - 1).astype(np.int64)

    t_col, t_row = cell_coordinates(terminal_x), cell_coordinates(terminal_y)
    by_cell = np.argsort(t_col * n_cells + t_row, kind="stable")
    sorted_cells = (t_col * n_cells + t_row)[by_cell]
    c_col, c_row = cell_coordinates(customer_x), cell_coordinates(customer_y)

    pair_customers: list[IntArray] = []
    pair_terminals: list[IntArray] = []
    for d_col in (-1, 0, 1):
        for d_row in (-1, 0, 1):
            col, row = c_col + d_col, c_row + d_row
            inside = (col >= 0) & (col < n_cells) & (row >= 0) & (row < n_cells)
            cell = col * n_cells + row
            first = np.searchsorted(sorted_cells, cell, side="left")
            counts = np.where(inside, np.searchsorted(sorted_cells, cell, side="right") - first, 0)
            pair_customers.append(np.repeat(np.arange(customer_x.size, dtype=np.int64), counts))
            pair_terminals.append(by_cell[_expand_ranges(first, counts)])
    customers = np.concatenate(pair_customers)
    terminals = np.concatenate(pair_terminals)

    distance = np.sqrt(
        np.square(customer_x[customers] - terminal_x[terminals])
        + np.square(customer_y[customers] - terminal_y[terminals])
    )
    near = distance < radius
    customers, terminals = customers[near], terminals[near]
    order = np.lexsort((terminals, customers))
    offsets = np.zeros(customer_x.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(customers, minlength=customer_x.size), out=offsets[1:])
    return offsets, terminals[order].astype(np.int64)


def _expand_ranges(starts: IntArray, counts: IntArray) -> IntArray:
    """Concatenate ``arange(s, s + n)`` for each pair, without a Python loop.

    >>> _expand_ranges(np.array([10, 0, 5]), np.array([2, 0, 3])).tolist()
    [10, 11, 5, 6, 7]
    """
    total = int(counts.sum())
    group_start = np.cumsum(counts) - counts
    within = np.arange(total, dtype=np.int64) - np.repeat(group_start, counts)
    return np.repeat(starts, counts).astype(np.int64) + within


def _transactions(
    n_days: int,
    customers: _Customers,
    offsets: IntArray,
    terminal_ids: IntArray,
    rng: np.random.Generator,
) -> _Transactions:
    n_customers = customers.x.size
    per_day = rng.poisson(customers.mean_tx_per_day[:, None], size=(n_customers, n_days))
    # Row-major (customer, day) flattening keeps the draws grouped by customer with days
    # ascending, which scenario 3 relies on to find a customer's transactions by bisection.
    flat_counts = per_day.ravel()
    customer = np.repeat(np.repeat(np.arange(n_customers, dtype=np.int64), n_days), flat_counts)
    day = np.repeat(np.tile(np.arange(n_days, dtype=np.int64), n_customers), flat_counts)

    # astype truncates toward zero, as the reference's int() does.
    time_of_day = rng.normal(_TIME_OF_DAY_MEAN, _TIME_OF_DAY_STD, customer.size).astype(np.int64)
    n_terminals = np.diff(offsets)
    keep = (time_of_day > 0) & (time_of_day < _DAY_SECONDS) & (n_terminals[customer] > 0)
    customer, day, time_of_day = customer[keep], day[keep], time_of_day[keep]

    mean = customers.mean_amount[customer]
    amount = rng.normal(mean, mean / 2)
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2 * mean[negative])
    terminal = terminal_ids[offsets[customer] + rng.integers(0, n_terminals[customer])]
    return _Transactions(
        customer=customer,
        terminal=terminal,
        day=day,
        seconds=time_of_day + day * _DAY_SECONDS,
        amount=np.round(amount, 2),
    )


def _add_frauds(
    config: SimulatorConfig, tx: _Transactions, rng: np.random.Generator
) -> tuple[FloatArray, ByteArray, ByteArray]:
    """Label the three fraud scenarios; returns ``(amount, fraud, scenario)``."""
    amount = tx.amount.copy()
    scenario = np.zeros(amount.size, dtype=np.int8)
    compromise_days = np.arange(config.n_days - 1, dtype=np.int64)

    scenario[amount > config.amount_threshold] = 1

    terminals = _draw_per_day(
        rng, config.n_terminals, config.compromised_terminals_per_day, compromise_days.size
    )
    starts = np.repeat(compromise_days, config.compromised_terminals_per_day)
    windowed = _in_window(
        tx.terminal, tx.day, terminals.ravel(), starts, config.terminal_compromise_days
    )
    scenario[windowed] = 2

    # A transaction in overlapping windows can be drawn on several days and is multiplied
    # each time, so the days apply in order: a short loop over days, each step bisecting
    # only the draws of a handful of customers.
    customer_bounds = np.searchsorted(tx.customer, np.arange(config.n_customers + 1))
    for day in compromise_days.tolist():
        drawn = rng.choice(config.n_customers, config.compromised_customers_per_day, replace=False)
        pools = []
        for customer in drawn.tolist():
            lo, hi = customer_bounds[customer], customer_bounds[customer + 1]
            days = tx.day[lo:hi]
            first = lo + np.searchsorted(days, day, side="left")
            last = lo + np.searchsorted(days, day + config.customer_compromise_days, side="left")
            pools.append(np.arange(first, last, dtype=np.int64))
        pool = np.concatenate(pools) if pools else np.empty(0, dtype=np.int64)
        n_frauds = int(pool.size * config.customer_fraud_fraction)
        if n_frauds == 0:
            continue
        chosen = rng.choice(pool, n_frauds, replace=False)
        amount[chosen] = np.round(amount[chosen] * config.customer_fraud_amount_factor, 2)
        scenario[chosen] = 3

    fraud = (scenario > 0).astype(np.int8)
    return amount, fraud, scenario


def _draw_per_day(rng: np.random.Generator, population: int, per_day: int, days: int) -> IntArray:
    """``days`` rows of ``per_day`` distinct ids drawn from ``range(population)``."""
    rows = [rng.choice(population, per_day, replace=False) for _ in range(days)]
    if not rows:
        return np.empty((0, per_day), dtype=np.int64)
    return np.stack(rows).astype(np.int64)


def _in_window(
    keys: IntArray, days: IntArray, event_keys: IntArray, event_days: IntArray, length: int
) -> npt.NDArray[np.bool_]:
    """Whether each ``(key, day)`` falls in ``[d, d + length)`` of an event ``(key, d)``.

    All windows have the same length, so it is enough to test the latest event of the same
    key starting on or before the day, found by bisection over the sorted events.

    >>> _in_window(np.array([7, 7, 7, 8]), np.array([1, 3, 5, 3]),
    ...            np.array([7]), np.array([2]), 3).tolist()
    [False, True, False, False]
    """
    if event_keys.size == 0 or length <= 0:
        return np.zeros(keys.size, dtype=bool)
    stride = int(max(days.max(initial=0), event_days.max())) + 1
    events = np.sort(event_keys * stride + event_days)
    latest = np.searchsorted(events, keys * stride + days, side="right") - 1
    found = events[np.maximum(latest, 0)]
    same_key = (latest >= 0) & (found // stride == keys)
    inside: npt.NDArray[np.bool_] = same_key & (days - found % stride < length)
    return inside
