"""The event contract: what the worker reads and writes, validated where it enters.

Inbound, one entry point per type, each raising :class:`~stream_app.errors.RejectedEvent`
with a machine-readable :class:`~stream_app.errors.RejectReason`:

* :func:`parse_transaction` -> :class:`TransactionEvent`
* :func:`parse_label` -> :class:`Label`
* :func:`parse_control` -> :class:`Control` (operators' lists and threshold overrides)

Outbound: :class:`ScoreRecord` on the scores topic, and dead letters, whose value is the
original bytes and whose headers are named in :class:`DeadLetterHeaders`.

The pydantic models are the one definition of the contract. The JSON Schema files in
``stream_app/json_schemas/`` are generated from them (``python -m stream_app.records``) and
a test fails when they drift.
"""

from __future__ import annotations

import enum
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NoReturn, Self, TypeVar

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stream_app.errors import ConfigError, RejectedEvent, RejectReason
from stream_app.features import MAX_AMOUNT

MAX_IDENTIFIER_LENGTH: Final = 64
MAX_REASONS: Final = 5
MAX_REASON_LENGTH: Final = 120
# Attributions of an alert: its earlier transactions and feature groups, largest first.
MAX_ATTRIBUTIONS: Final = 16
JSON_SCHEMA_DIR: Final = Path(__file__).parent / "json_schemas"

# How far past the worker's clock an event time may lie. Card networks and acquirers stamp
# transactions with clocks kept in sync (NTP); minutes cover any honest skew, as in Kerberos'
# 5-minute default. Further ahead is a wrong clock or a wrong time zone: dead-lettered
# (timestamp_out_of_range) rather than scored, since an event dated hours ahead would sit in its
# customer's history ahead of everything that follows. The Handbook data has no future event.
MAX_CLOCK_SKEW: Final = timedelta(minutes=5)
_PREVIEW_CHARS: Final = 80
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Python ints this large are past any id a producer could mean; bounding them first also
# keeps str() away from its 4,300-digit limit.
_INT_ID_BOUND: Final = 10**MAX_IDENTIFIER_LENGTH


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    """Bounds on inbound events, built once from the settings and passed to the parsers.

    Args:
        max_payload_bytes: Larger messages are refused before any parsing is spent on them.
        min_timestamp: Events older than this are refused; must carry a UTC offset.
        max_future: How far past the worker's clock an event time may lie (clock skew).
    """

    max_payload_bytes: int = 16 * 1024
    min_timestamp: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    max_future: timedelta = MAX_CLOCK_SKEW

    def __post_init__(self) -> None:
        if self.max_payload_bytes <= 0:
            raise ConfigError(f"max_payload_bytes must be positive, got {self.max_payload_bytes}")
        if self.min_timestamp.utcoffset() is None:
            raise ConfigError("min_timestamp must carry a UTC offset, e.g. 2000-01-01T00:00:00Z")
        if self.max_future < timedelta(0):
            raise ConfigError(f"max_future must not be negative, got {self.max_future}")


DEFAULT_LIMITS: Final = ValidationLimits()


def _preview(value: object) -> str:
    """A short repr of an offending value: details are logged and sent as headers."""
    if isinstance(value, str) and len(value) > _PREVIEW_CHARS:
        value = value[:_PREVIEW_CHARS]  # slice first: repr of a 16 KiB string is wasted work
    return _clip(repr(value))


def _clip(text: str) -> str:
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "..."


def _invalid(reason: RejectReason, message: str) -> PydanticCustomError:
    # The error type is the reason itself, so mapping a ValidationError back is a lookup.
    # The message goes in as context: a preview may contain braces the template would eat.
    return PydanticCustomError(reason.value, "{detail}", {"detail": message})


def _identifier(value: object) -> str:
    if isinstance(value, str):
        if not value or value.isspace():
            raise _invalid(RejectReason.IDENTIFIER_EMPTY, "must not be empty or blank")
        if len(value) > MAX_IDENTIFIER_LENGTH:
            raise _invalid(
                RejectReason.IDENTIFIER_TOO_LONG,
                f"{len(value)} characters, at most {MAX_IDENTIFIER_LENGTH}: {_preview(value)}",
            )
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _invalid(RejectReason.WRONG_TYPE, f"integer ids must not be negative: {value}")
        if value >= _INT_ID_BOUND:
            raise _invalid(RejectReason.IDENTIFIER_TOO_LONG, "integer id has over 64 digits")
        return str(value)  # the simulator's ids are ints; state keys and features want one type
    raise _invalid(
        RejectReason.WRONG_TYPE,
        f"expected a string or a non-negative integer, got {_preview(value)}",
    )


def _amount(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(RejectReason.WRONG_TYPE, f"expected a number, got {_preview(value)}")
    try:
        amount = float(value)
    except OverflowError:  # an int past the float range, from the stdlib fallback parser
        raise _invalid(RejectReason.AMOUNT_NOT_FINITE, "integer too large for a float") from None
    if not math.isfinite(amount):
        raise _invalid(RejectReason.AMOUNT_NOT_FINITE, f"{amount} is not a finite number")
    if amount < 0:
        raise _invalid(RejectReason.AMOUNT_NEGATIVE, f"{amount} is below 0")
    if amount > MAX_AMOUNT:
        raise _invalid(
            RejectReason.AMOUNT_TOO_LARGE, f"{amount:.6g} is above the maximum {MAX_AMOUNT:,.0f}"
        )
    return amount + 0.0  # turns -0.0 into 0.0, so no record shows a negative-looking amount


def _timestamp(value: object) -> datetime:
    if isinstance(value, str | datetime):  # a datetime: a model built in Python, not from JSON
        try:
            moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
        except ValueError:
            raise _invalid(
                RejectReason.TIMESTAMP_UNPARSEABLE, f"not ISO-8601: {_preview(value)}"
            ) from None
        if moment.utcoffset() is None:
            # A naive time means whatever zone the producer ran in: refuse to guess.
            raise _invalid(RejectReason.TIMESTAMP_UNPARSEABLE, f"no UTC offset: {_preview(value)}")
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise _invalid(
                RejectReason.TIMESTAMP_OUT_OF_RANGE, f"outside datetime range: {_preview(value)}"
            ) from None
    # Integers only: a float epoch is ambiguous between seconds and milliseconds.
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return _EPOCH + timedelta(milliseconds=value)
        except OverflowError:
            raise _invalid(
                RejectReason.TIMESTAMP_OUT_OF_RANGE, f"epoch ms outside datetime range: {value}"
            ) from None
    raise _invalid(
        RejectReason.WRONG_TYPE,
        f"expected an ISO-8601 string or integer epoch milliseconds, got {_preview(value)}",
    )


def _currency(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(RejectReason.WRONG_TYPE, f"expected a string, got {_preview(value)}")
    if len(value) != 3 or not (value.isascii() and value.isalpha() and value.isupper()):
        raise _invalid(
            RejectReason.INVALID_CURRENCY, f"expected 3 upper-case letters, got {_preview(value)}"
        )
    return value


Identifier = Annotated[
    str,
    BeforeValidator(_identifier),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": MAX_IDENTIFIER_LENGTH},
                {"type": "integer", "minimum": 0},
            ],
            "description": "Non-blank string or non-negative integer; read as a string.",
        }
    ),
]
Amount = Annotated[
    float,
    BeforeValidator(_amount),
    WithJsonSchema(
        {
            "type": "number",
            "minimum": 0,
            "maximum": MAX_AMOUNT,
            "description": "Finite, from 0 to 1e9.",
        }
    ),
]
Timestamp = Annotated[
    datetime,
    BeforeValidator(_timestamp),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}],
            "description": "ISO-8601 with a UTC offset, or integer epoch milliseconds.",
        }
    ),
]
Currency = Annotated[
    str | None,
    BeforeValidator(_currency),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "pattern": "^[A-Z]{3}$"}, {"type": "null"}],
            "description": "ISO 4217 code, e.g. EUR.",
        }
    ),
]


class TransactionEvent(BaseModel):
    """One card payment. Unknown fields are allowed and ignored."""

    # Unknown fields are kept in ``model_extra`` so producers can add fields before we read them.
    model_config = ConfigDict(extra="allow", frozen=True)

    transaction_id: Identifier
    customer_id: Identifier
    terminal_id: Identifier
    amount: Amount
    timestamp: Timestamp
    currency: Currency = None

    @property
    def event_time_s(self) -> float:
        """Event time in epoch seconds, UTC: the unit the features use."""
        return self.timestamp.timestamp()


class Label(BaseModel):
    """A fraud verdict on an earlier transaction; it carries the keys, so state needs no lookup."""

    model_config = ConfigDict(extra="allow", frozen=True)

    transaction_id: Identifier
    customer_id: Identifier
    terminal_id: Identifier
    is_fraud: StrictBool
    event_time: Timestamp
    reported_at: Timestamp

    @property
    def event_time_s(self) -> float:
        """Time of the labelled transaction in epoch seconds, UTC."""
        return self.event_time.timestamp()

    @property
    def reported_at_s(self) -> float:
        """When the verdict was reported, in epoch seconds, UTC."""
        return self.reported_at.timestamp()


def transaction_json(
    transaction_id: str | int,
    customer_id: str | int,
    terminal_id: str | int,
    timestamp_ms: int,
    amount: float,
) -> bytes:
    """The JSON of one :class:`TransactionEvent` as a producer writes it (ids as strings,
    an epoch-millisecond timestamp): what replay, the bench and the tests publish.

    >>> transaction_json(1, 7, 2, 1522573200000, 20.5)
    b'{"transaction_id":"1","customer_id":"7","terminal_id":"2","amount":20.5,"timestamp":1522573200000}'
    """
    return orjson.dumps(
        {
            "transaction_id": str(transaction_id),
            "customer_id": str(customer_id),
            "terminal_id": str(terminal_id),
            "amount": amount,
            "timestamp": timestamp_ms,
        }
    )


def label_json(
    transaction_id: str | int,
    customer_id: str | int,
    terminal_id: str | int,
    event_time_ms: int,
    is_fraud: bool,
    reported_at_ms: int,
) -> bytes:
    """The JSON of one :class:`Label` (ids as strings, epoch-millisecond times)."""
    return orjson.dumps(
        {
            "transaction_id": str(transaction_id),
            "customer_id": str(customer_id),
            "terminal_id": str(terminal_id),
            "is_fraud": is_fraud,
            "event_time": event_time_ms,
            "reported_at": reported_at_ms,
        }
    )


class ControlAction(enum.StrEnum):
    """What an operator's control does: a list entry, or a threshold override."""

    BLOCK = "block"  # every transaction of the subject is declined
    ALLOW = "allow"  # every transaction of the subject is approved (a block still wins)
    THRESHOLDS = "thresholds"  # the champion's review and decline thresholds are replaced


class ControlSubject(enum.StrEnum):
    """Whom a list entry names."""

    CUSTOMER = "customer"
    TERMINAL = "terminal"


MAX_CONTROL_NOTE_CHARS: Final = 500


class Control(BaseModel):
    """An operator's change to how the worker decides, published on the controls topic.

    A list entry puts one customer or terminal on the block or the allow list (a subject is
    on one list at most: its latest entry wins); a threshold override replaces the review
    and decline thresholds of one champion version, so that a model swap never inherits
    cut-offs chosen for another model's scores. ``active`` false lifts the entry or the
    override. Every worker reads the whole topic (compacted, keyed by :attr:`key`): the
    latest record of each key is in force.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: ControlAction
    active: StrictBool
    subject: ControlSubject | None = None
    subject_id: Identifier | None = None
    model_version: str | None = Field(default=None, min_length=1, max_length=128)
    review_threshold: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    decline_threshold: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    changed_by: Identifier
    changed_at: Timestamp
    note: str = Field(default="", max_length=MAX_CONTROL_NOTE_CHARS)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.action is ControlAction.THRESHOLDS:
            if self.model_version is None or self.subject is not None:
                raise ValueError("a threshold override names a model_version and no subject")
            review, decline = self.review_threshold, self.decline_threshold
            if self.active and (review is None or decline is None or review > decline):
                raise ValueError(
                    "an active threshold override needs review_threshold <= decline_threshold"
                )
        elif self.subject is None or self.subject_id is None:
            raise ValueError(f"a {self.action} entry names a subject and a subject_id")
        elif self.review_threshold is not None or self.decline_threshold is not None:
            raise ValueError(f"a {self.action} entry carries no thresholds")
        return self

    @property
    def key(self) -> str:
        """Its key on the controls topic: one per subject, or per model version."""
        if self.action is ControlAction.THRESHOLDS:
            return f"thresholds:{self.model_version}"
        return f"list:{self.subject}:{self.subject_id}"

    def to_json(self) -> bytes:
        """The record's JSON, as published on the controls topic."""
        return self.model_dump_json(exclude_none=True).encode()


class Decision(enum.StrEnum):
    """What the worker recommends for a scored transaction."""

    APPROVE = "approve"
    REVIEW = "review"
    DECLINE = "decline"


UtcMillis = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")]
RecordId = Annotated[str, Field(min_length=1, max_length=MAX_IDENTIFIER_LENGTH)]
ReasonText = Annotated[str, Field(min_length=1, max_length=MAX_REASON_LENGTH)]


def iso_utc_millis(epoch_s: float) -> str:
    """Format epoch seconds as the ISO-8601 UTC form used on outbound records.

    >>> iso_utc_millis(1522540992.5)
    '2018-04-01T00:03:12.500Z'
    """
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class Attribution(BaseModel):
    """How much one thing drove an alert's score: the drop in log-odds when it is taken away.

    ``transaction``: an earlier transaction of the customer (``transactions_before`` 1 is
    the previous one), with its amount and how long before the alerted one it was;
    ``features``: a group of the alerted transaction's own features (``group``), set to an
    unremarkable value. See :mod:`stream_app.scoring.reasons`.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["transaction", "features"]
    log_odds: float = Field(allow_inf_nan=False)
    group: str | None = None
    transactions_before: int | None = Field(default=None, ge=1)
    amount: float | None = Field(default=None, allow_inf_nan=False)
    seconds_before: float | None = Field(default=None, allow_inf_nan=False)

    def as_dict(self) -> dict[str, Any]:
        """The fields that apply to its kind (the others are left out of the JSON)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


class ScoreRecord(BaseModel):
    """The worker's verdict on one transaction, published on the scores topic."""

    # to_json always writes every field, so the published schema requires them all.
    model_config = ConfigDict(frozen=True, json_schema_serialization_defaults_required=True)

    transaction_id: RecordId
    customer_id: RecordId
    terminal_id: RecordId
    amount: float = Field(ge=0, allow_inf_nan=False)
    event_time: UtcMillis
    score: float = Field(ge=0, le=1, allow_inf_nan=False)
    decision: Decision
    reasons: tuple[ReasonText, ...] = Field(default=(), max_length=MAX_REASONS)
    # Alerts only: what drove the score, for downstream tools (empty on approvals).
    attributions: tuple[Attribution, ...] = Field(default=(), max_length=MAX_ATTRIBUTIONS)
    model_version: str = Field(min_length=1)
    scored_at: UtcMillis

    def to_json(self) -> bytes:
        """Serialise for the scores topic (see :func:`score_record_json`)."""
        return score_record_json(
            transaction_id=self.transaction_id,
            customer_id=self.customer_id,
            terminal_id=self.terminal_id,
            amount=self.amount,
            event_time=self.event_time,
            score=self.score,
            decision=self.decision,
            reasons=self.reasons,
            attributions=[a.as_dict() for a in self.attributions],
            model_version=self.model_version,
            scored_at=self.scored_at,
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Self:
        """Read a record from the scores topic; raises pydantic's ``ValidationError``.

        Scores are our own output, so a bad one is a bug to surface, not an event to reject.
        """
        return cls.model_validate_json(raw)


_M = TypeVar("_M", bound=BaseModel)


def score_record_json(
    *,
    transaction_id: str,
    customer_id: str,
    terminal_id: str,
    amount: float,
    event_time: str,
    score: float,
    decision: Decision,
    reasons: Sequence[str],
    attributions: Sequence[dict[str, Any]],
    model_version: str,
    scored_at: str,
) -> bytes:
    """The JSON of one :class:`ScoreRecord`: every field, in its order, through orjson.

    The worker writes its records with this, not through the model: every value was
    computed and bounded by the worker itself, and validating 20,000 models a second would
    be wasted (``tests/stream_app/test_records.py`` reads the bytes back through the model).
    """
    return orjson.dumps(
        {
            "transaction_id": transaction_id,
            "customer_id": customer_id,
            "terminal_id": terminal_id,
            "amount": amount,
            "event_time": event_time,
            "score": score,
            "decision": decision.value,
            "reasons": reasons,
            "attributions": attributions,
            "model_version": model_version,
            "scored_at": scored_at,
        }
    )


def _rejection(exc: ValidationError) -> RejectedEvent:
    """Turn pydantic's first error into a rejection: fields validate in declaration order."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or "<event>"
    if first["type"] == "missing":
        return RejectedEvent(RejectReason.MISSING_FIELD, f"{field}: required field is missing")
    try:
        reason = RejectReason(first["type"])
    except ValueError:  # a pydantic type check, e.g. ``bool_type`` on a strict bool
        return RejectedEvent(
            RejectReason.WRONG_TYPE, f"{field}: {first['msg']}, got {_preview(first['input'])}"
        )
    return RejectedEvent(reason, f"{field}: {first['msg']}")


def _validate(document: object, model: type[_M]) -> _M:
    if not isinstance(document, dict):
        kind = "null" if document is None else type(document).__name__
        raise RejectedEvent(RejectReason.NOT_OBJECT, f"expected a JSON object, got {kind}")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _rejection(exc) from exc


def _reject_unparsed(raw: bytes, error: orjson.JSONDecodeError, model: type[BaseModel]) -> NoReturn:
    """Explain why orjson refused ``raw``, which always ends in a rejection.

    orjson refuses ``NaN``, ``Infinity`` and numbers past the float range, but an amount of
    ``NaN`` is a bad amount rather than bad JSON. The stdlib parser accepts those literals,
    so when it finds one, the model names the field at fault; if no field is at fault (the
    literal sits in an unknown field), the payload is still not strict JSON.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedEvent(RejectReason.INVALID_UTF8, f"byte {exc.start}: {exc.reason}") from None
    non_finite: list[str] = []

    def number(literal: str) -> float:
        value = float(literal)
        if math.isinf(value):
            non_finite.append(literal)
        return value

    def integer(literal: str) -> int | float:
        value = float(literal)  # an int past the float range is infinite here, not an error
        if math.isinf(value):
            non_finite.append(literal)
            return value
        return int(literal)

    def constant(literal: str) -> float:
        non_finite.append(literal)
        return float(literal)

    try:
        document = json.loads(text, parse_float=number, parse_int=integer, parse_constant=constant)
    except (ValueError, RecursionError):  # RecursionError: deep nesting within the size limit
        pass
    else:
        if non_finite:
            _validate(document, model)
            raise RejectedEvent(
                RejectReason.NOT_JSON, f"{_clip(non_finite[0])} is not a JSON number"
            ) from error
    raise RejectedEvent(RejectReason.NOT_JSON, _clip(str(error))) from error


def _parse(raw: bytes, model: type[_M], limits: ValidationLimits) -> _M:
    if len(raw) > limits.max_payload_bytes:
        raise RejectedEvent(
            RejectReason.PAYLOAD_TOO_LARGE,
            f"{len(raw)} bytes, at most {limits.max_payload_bytes}",
        )
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _reject_unparsed(raw, exc, model)
    return _validate(document, model)


def _check_time(field: str, moment: datetime, limits: ValidationLimits, now_s: float) -> None:
    if moment < limits.min_timestamp:
        raise RejectedEvent(
            RejectReason.TIMESTAMP_OUT_OF_RANGE,
            f"{field}: {moment.isoformat()} is before {limits.min_timestamp.isoformat()}",
        )
    if moment.timestamp() > now_s + limits.max_future.total_seconds():
        raise RejectedEvent(
            RejectReason.TIMESTAMP_OUT_OF_RANGE,
            f"{field}: {moment.isoformat()} is more than {limits.max_future} in the future",
        )


def parse_transaction(raw: bytes, limits: ValidationLimits = DEFAULT_LIMITS) -> TransactionEvent:
    """Validate one message from the transactions topic.

    Args:
        raw: The message value, untouched.
        limits: Size and time bounds; the worker passes the ones from its settings.

    Returns:
        The event, identifiers as strings and ``timestamp`` in UTC.

    Raises:
        RejectedEvent: With the reason of the first problem found.
    """
    event = _parse(raw, TransactionEvent, limits)
    _check_time("timestamp", event.timestamp, limits, time.time())
    return event


def parse_control(raw: bytes, limits: ValidationLimits = DEFAULT_LIMITS) -> Control:
    """Validate one message from the controls topic; same contract as :func:`parse_label`."""
    return _parse(raw, Control, limits)


def parse_label(raw: bytes, limits: ValidationLimits = DEFAULT_LIMITS) -> Label:
    """Validate one message from the labels topic; same contract as :func:`parse_transaction`."""
    label = _parse(raw, Label, limits)
    now_s = time.time()
    _check_time("event_time", label.event_time, limits, now_s)
    _check_time("reported_at", label.reported_at, limits, now_s)
    return label


class DeadLetterHeaders:
    """Header names on a dead-letter message, whose value is the original bytes, untouched."""

    REASON: Final = "dlq.reason"
    DETAIL: Final = "dlq.detail"
    SOURCE_TOPIC: Final = "dlq.source.topic"
    SOURCE_PARTITION: Final = "dlq.source.partition"
    SOURCE_OFFSET: Final = "dlq.source.offset"
    FAILED_AT: Final = "dlq.failed_at"


def dead_letter_headers(
    error: RejectedEvent,
    topic: str,
    partition: int,
    offset: int,
    *,
    failed_at_s: float | None = None,
) -> list[tuple[str, bytes]]:
    """Kafka headers saying why and where a message failed, so it can be found and replayed.

    Args:
        error: The rejection; its reason and detail become headers.
        topic: Source topic of the message.
        partition: Source partition.
        offset: Source offset.
        failed_at_s: When it failed, epoch seconds; defaults to now.
    """
    when = time.time() if failed_at_s is None else failed_at_s
    return [
        (DeadLetterHeaders.REASON, error.reason.value.encode()),
        (DeadLetterHeaders.DETAIL, error.detail.encode("utf-8", "backslashreplace")),
        (DeadLetterHeaders.SOURCE_TOPIC, topic.encode()),
        (DeadLetterHeaders.SOURCE_PARTITION, str(partition).encode()),
        (DeadLetterHeaders.SOURCE_OFFSET, str(offset).encode()),
        (DeadLetterHeaders.FAILED_AT, iso_utc_millis(when).encode()),
    ]


_SCHEMA_SOURCES: Final[
    tuple[tuple[str, type[BaseModel], Literal["validation", "serialization"]], ...]
] = (
    # Inbound types describe what we accept; the outbound one describes what we emit.
    ("transaction_event.schema.json", TransactionEvent, "validation"),
    ("label.schema.json", Label, "validation"),
    ("score_record.schema.json", ScoreRecord, "serialization"),
    ("control.schema.json", Control, "validation"),
)


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each public topic's records, keyed by file name."""
    return {
        name: {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            **model.model_json_schema(mode=mode),
        }
        for name, model, mode in _SCHEMA_SOURCES
    }


def render_json_schema(schema: dict[str, Any]) -> str:
    """Deterministic text of a schema, so regenerating an unchanged contract is a no-op."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_json_schemas(directory: Path = JSON_SCHEMA_DIR) -> list[Path]:
    """Write every schema from :func:`json_schemas` into ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(render_json_schema(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_json_schemas(
        Path(sys.argv[1]) if len(sys.argv) > 1 else JSON_SCHEMA_DIR
    ):
        print(written_path)
