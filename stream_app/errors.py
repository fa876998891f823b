"""One root for every error this project raises on purpose.

::

    FraudStreamError
    ├── ConfigError          a setting is wrong: fail at start-up, say what to fix
    ├── ModelError           a model directory or card is unusable: refuse it
    └── RejectedEvent        an inbound event is invalid: dead-letter it with a reason
                             (``.reason``: a :class:`RejectReason`, ``.detail``: for humans)
"""

from __future__ import annotations

import enum
from typing import Final


class FraudStreamError(Exception):
    """Root of the project's errors."""


class ConfigError(FraudStreamError):
    """A setting is missing or wrong; the message says which one and how to fix it."""


class ModelError(FraudStreamError):
    """A model file or model card fails to load or fails its checks."""


class RejectReason(enum.StrEnum):
    """Why an inbound event was refused: a bounded, machine-readable value.

    The values go into the dead-letter headers and label the rejection metric, so they are
    stable snake_case strings; add a member rather than renaming one.
    """

    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_UTF8 = "invalid_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    IDENTIFIER_EMPTY = "identifier_empty"
    IDENTIFIER_TOO_LONG = "identifier_too_long"
    AMOUNT_NOT_FINITE = "amount_not_finite"
    AMOUNT_NEGATIVE = "amount_negative"
    AMOUNT_TOO_LARGE = "amount_too_large"
    TIMESTAMP_UNPARSEABLE = "timestamp_unparseable"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    INVALID_CURRENCY = "invalid_currency"
    # Not from validation: a valid event the serving model gave no probability for (a
    # model fault); dead-lettered so that it can be replayed once the model is fixed.
    UNSCORABLE = "unscorable"
    # Not from validation either: what the state found. A transaction id already used for
    # another transaction (other amount, time, terminal or customer); a label whose
    # transaction has another customer, terminal or time; a label whose transaction was not
    # seen within the label wait.
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    LABEL_MISMATCH = "label_mismatch"
    LABEL_UNKNOWN_TRANSACTION = "label_unknown_transaction"


# The reasons the model's output or the state give, not validation.
STATE_REASONS: Final = (
    RejectReason.UNSCORABLE,
    RejectReason.CONFLICTING_DUPLICATE,
    RejectReason.LABEL_MISMATCH,
    RejectReason.LABEL_UNKNOWN_TRANSACTION,
)
# The reasons validation gives.
VALIDATION_REASONS: Final = tuple(r for r in RejectReason if r not in STATE_REASONS)


class RejectedEvent(FraudStreamError):
    """An inbound event failed validation; it is dead-lettered, never fatal.

    Args:
        reason: What kind of failure, for metrics and the dead-letter headers.
        detail: Which field and what was wrong, for a human; never the whole payload.

    >>> err = RejectedEvent(RejectReason.AMOUNT_NEGATIVE, "amount: -3.0 is below 0")
    >>> str(err)
    'amount_negative: amount: -3.0 is below 0'
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        # Both go to Exception.args so the error pickles and reprs with its reason.
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
