"""The event contract: every rejection reason, every accepted form, and the generated schemas."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream_app.errors import (
    VALIDATION_REASONS,
    ConfigError,
    FraudStreamError,
    RejectedEvent,
    RejectReason,
)
from stream_app.records import (
    DEFAULT_LIMITS,
    JSON_SCHEMA_DIR,
    DeadLetterHeaders,
    Decision,
    Label,
    ScoreRecord,
    TransactionEvent,
    ValidationLimits,
    dead_letter_headers,
    iso_utc_millis,
    json_schemas,
    label_json,
    parse_label,
    parse_transaction,
    render_json_schema,
    transaction_json,
    write_json_schemas,
)

# 2018-04-01T00:03:12Z, the first transaction of the simulator's default window.
T0_S = 1522540992
T0_ISO = "2018-04-01T00:03:12Z"

TX: dict[str, Any] = {
    "transaction_id": "tx-1",
    "customer_id": "c-1",
    "terminal_id": "t-1",
    "amount": 57.16,
    "timestamp": T0_ISO,
}
LABEL: dict[str, Any] = {
    "transaction_id": "tx-1",
    "customer_id": "c-1",
    "terminal_id": "t-1",
    "is_fraud": True,
    "event_time": T0_ISO,
    "reported_at": "2018-04-03T10:00:00Z",
}


def tx_bytes(**changes: Any) -> bytes:
    """A transaction as JSON bytes; a change to ``...`` drops the field."""
    doc = {**TX, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def label_bytes(**changes: Any) -> bytes:
    doc = {**LABEL, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def tx_with_raw_amount(literal: bytes) -> bytes:
    """A transaction whose amount is a literal json.dumps would not write (or writes as NaN)."""
    return tx_bytes(amount=0.5).replace(b'"amount": 0.5', b'"amount": ' + literal)


def in_days(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


# ---------------------------------------------------------------------------------------
# Rejections: one row per way of failing, each asserting the exact reason.

R = RejectReason
TRANSACTION_REJECTIONS: list[tuple[RejectReason, bytes]] = [
    (R.PAYLOAD_TOO_LARGE, tx_bytes(note="x" * (16 * 1024))),
    # The size check comes before parsing: oversized garbage is too large, not "not JSON".
    (R.PAYLOAD_TOO_LARGE, b"\xff" * (16 * 1024 + 1)),
    (R.INVALID_UTF8, b'{"transaction_id": "\xff\xfe", "amount": 1}'),
    (R.INVALID_UTF8, tx_bytes(note="caf\u00e9").replace(b"\\u00e9", b"\xe9")),
    (R.NOT_JSON, b""),
    (R.NOT_JSON, b'{"transaction_id": "tx-1",'),
    (R.NOT_JSON, b"{'transaction_id': 'tx-1'}"),
    (R.NOT_JSON, b'"\\ud800"'),  # a lone surrogate: the stdlib would accept it, orjson not
    (R.NOT_JSON, tx_bytes()[:-1] + b', "extra": NaN}'),  # NaN outside amount: still not JSON
    (R.NOT_OBJECT, b"[]"),
    (R.NOT_OBJECT, b'"tx-1"'),
    (R.NOT_OBJECT, b"42"),
    (R.NOT_OBJECT, b"null"),
    (R.MISSING_FIELD, tx_bytes(amount=...)),
    (R.MISSING_FIELD, tx_bytes(timestamp=...)),
    (R.MISSING_FIELD, tx_bytes(transaction_id=...)),
    (R.WRONG_TYPE, tx_bytes(amount="57.16")),
    (R.WRONG_TYPE, tx_bytes(amount=True)),
    (R.WRONG_TYPE, tx_bytes(amount=None)),
    (R.WRONG_TYPE, tx_bytes(customer_id=1.5)),
    (R.WRONG_TYPE, tx_bytes(customer_id=None)),
    (R.WRONG_TYPE, tx_bytes(customer_id=-3)),
    (R.WRONG_TYPE, tx_bytes(terminal_id=["t-1"])),
    (R.WRONG_TYPE, tx_bytes(timestamp=float(T0_S * 1000))),  # float epochs are ambiguous
    (R.WRONG_TYPE, tx_bytes(timestamp=True)),
    (R.WRONG_TYPE, tx_bytes(currency=978)),
    (R.IDENTIFIER_EMPTY, tx_bytes(transaction_id="")),
    (R.IDENTIFIER_EMPTY, tx_bytes(terminal_id="   ")),
    (R.IDENTIFIER_TOO_LONG, tx_bytes(customer_id="c" * 65)),
    (R.AMOUNT_NOT_FINITE, tx_bytes(amount=float("nan"))),
    (R.AMOUNT_NOT_FINITE, tx_bytes(amount=float("inf"))),
    (R.AMOUNT_NOT_FINITE, tx_bytes(amount=float("-inf"))),
    (R.AMOUNT_NOT_FINITE, tx_with_raw_amount(b"1e400")),
    (R.AMOUNT_NOT_FINITE, tx_with_raw_amount(b"-1e400")),
    (R.AMOUNT_NOT_FINITE, tx_with_raw_amount(b"1" + b"0" * 400)),
    (R.AMOUNT_NEGATIVE, tx_bytes(amount=-0.01)),
    (R.AMOUNT_NEGATIVE, tx_bytes(amount=-5)),
    (R.AMOUNT_TOO_LARGE, tx_bytes(amount=1e300)),
    (R.AMOUNT_TOO_LARGE, tx_bytes(amount=1_000_000_000.01)),
    (R.TIMESTAMP_UNPARSEABLE, tx_bytes(timestamp="yesterday")),
    (R.TIMESTAMP_UNPARSEABLE, tx_bytes(timestamp="")),
    (R.TIMESTAMP_UNPARSEABLE, tx_bytes(timestamp="2018-04-01T00:03:12")),  # naive
    (R.TIMESTAMP_UNPARSEABLE, tx_bytes(timestamp="2018-04-01")),  # naive, date only
    (R.TIMESTAMP_UNPARSEABLE, tx_bytes(timestamp=str(T0_S * 1000))),
    (R.TIMESTAMP_OUT_OF_RANGE, tx_bytes(timestamp="1999-12-31T23:59:59Z")),
    (R.TIMESTAMP_OUT_OF_RANGE, tx_bytes(timestamp=0)),
    (R.TIMESTAMP_OUT_OF_RANGE, tx_bytes(timestamp=-1)),
    (R.TIMESTAMP_OUT_OF_RANGE, tx_bytes(timestamp=in_days(2))),
    (R.TIMESTAMP_OUT_OF_RANGE, tx_bytes(timestamp=10**18)),  # past datetime's range
    (R.TIMESTAMP_OUT_OF_RANGE, tx_bytes(timestamp="0001-01-01T00:00:00+01:00")),
    (R.INVALID_CURRENCY, tx_bytes(currency="eur")),
    (R.INVALID_CURRENCY, tx_bytes(currency="EURO")),
    (R.INVALID_CURRENCY, tx_bytes(currency="E1R")),
    (R.INVALID_CURRENCY, tx_bytes(currency="ÄÖÜ")),
]


@pytest.mark.parametrize(
    ("reason", "raw"),
    TRANSACTION_REJECTIONS,
    ids=[f"{reason}-{i}" for i, (reason, _) in enumerate(TRANSACTION_REJECTIONS)],
)
def test_transaction_rejections_name_the_exact_reason(reason: RejectReason, raw: bytes) -> None:
    with pytest.raises(RejectedEvent) as caught:
        parse_transaction(raw)
    assert caught.value.reason is reason, caught.value.detail
    assert caught.value.detail


def test_every_reason_has_a_transaction_case() -> None:
    assert {reason for reason, _ in TRANSACTION_REJECTIONS} == set(VALIDATION_REASONS)


LABEL_REJECTIONS: list[tuple[RejectReason, bytes]] = [
    (R.PAYLOAD_TOO_LARGE, label_bytes(note="x" * (16 * 1024))),
    (R.INVALID_UTF8, b'{"transaction_id": "\xc3\x28"}'),
    (R.NOT_JSON, b"{"),
    (R.NOT_OBJECT, b"[true]"),
    (R.MISSING_FIELD, label_bytes(is_fraud=...)),
    (R.MISSING_FIELD, label_bytes(event_time=...)),
    (R.WRONG_TYPE, label_bytes(is_fraud=1)),
    (R.WRONG_TYPE, label_bytes(is_fraud="true")),
    (R.IDENTIFIER_EMPTY, label_bytes(customer_id="")),
    (R.IDENTIFIER_TOO_LONG, label_bytes(transaction_id="x" * 65)),
    (R.TIMESTAMP_UNPARSEABLE, label_bytes(reported_at="2018-04-03 10:00")),
    (R.TIMESTAMP_OUT_OF_RANGE, label_bytes(reported_at=in_days(3))),
    (R.TIMESTAMP_OUT_OF_RANGE, label_bytes(event_time="1990-01-01T00:00:00Z")),
]


@pytest.mark.parametrize(
    ("reason", "raw"),
    LABEL_REJECTIONS,
    ids=[f"{reason}-{i}" for i, (reason, _) in enumerate(LABEL_REJECTIONS)],
)
def test_label_rejections_name_the_exact_reason(reason: RejectReason, raw: bytes) -> None:
    with pytest.raises(RejectedEvent) as caught:
        parse_label(raw)
    assert caught.value.reason is reason, caught.value.detail


def test_rejection_is_a_fraudstream_error_with_a_readable_message() -> None:
    with pytest.raises(FraudStreamError) as caught:
        parse_transaction(tx_bytes(amount=-2.5))
    assert str(caught.value) == "amount_negative: amount: -2.5 is below 0"


def test_detail_names_the_field_and_clips_the_value() -> None:
    with pytest.raises(RejectedEvent) as caught:
        parse_transaction(tx_bytes(customer_id="secret-" + "9" * 5000))
    assert caught.value.detail.startswith("customer_id: 5007 characters")
    assert len(caught.value.detail) < 160


def test_the_first_invalid_field_decides() -> None:
    # Fields validate in declaration order: the id comes before the amount.
    with pytest.raises(RejectedEvent) as caught:
        parse_transaction(tx_bytes(transaction_id="", amount=-1))
    assert caught.value.reason is RejectReason.IDENTIFIER_EMPTY


def test_limits_come_from_the_caller() -> None:
    raw = tx_bytes()
    exact = ValidationLimits(max_payload_bytes=len(raw))
    assert parse_transaction(raw, exact).transaction_id == "tx-1"
    with pytest.raises(RejectedEvent) as caught:
        parse_transaction(raw, ValidationLimits(max_payload_bytes=len(raw) - 1))
    assert caught.value.reason is RejectReason.PAYLOAD_TOO_LARGE

    late_start = ValidationLimits(min_timestamp=datetime(2019, 1, 1, tzinfo=UTC))
    with pytest.raises(RejectedEvent) as caught:
        parse_transaction(raw, late_start)
    assert caught.value.reason is RejectReason.TIMESTAMP_OUT_OF_RANGE

    soon = tx_bytes(timestamp=in_days(2 / 1440))  # two minutes ahead: clock skew
    assert parse_transaction(soon).event_time_s > time.time()  # within the default 5 min
    hours_ahead = tx_bytes(timestamp=in_days(0.5))
    with pytest.raises(RejectedEvent):
        parse_transaction(hours_ahead)
    day = ValidationLimits(max_future=timedelta(days=1))
    assert parse_transaction(hours_ahead, day).event_time_s > time.time()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_payload_bytes": 0},
        {"min_timestamp": datetime(2000, 1, 1)},  # naive
        {"max_future": timedelta(seconds=-1)},
    ],
)
def test_bad_limits_fail_at_start_up(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ValidationLimits(**kwargs)


# ---------------------------------------------------------------------------------------
# Accepted forms.


def test_iso_with_z() -> None:
    event = parse_transaction(tx_bytes())
    assert event.event_time_s == T0_S
    assert event.timestamp == datetime(2018, 4, 1, 0, 3, 12, tzinfo=UTC)
    assert event.amount == 57.16
    assert event.currency is None


def test_iso_with_offset_is_converted_to_utc() -> None:
    event = parse_transaction(tx_bytes(timestamp="2018-04-01T02:03:12.250+02:00"))
    assert event.event_time_s == T0_S + 0.25
    assert event.timestamp.utcoffset() == timedelta(0)
    assert event.timestamp.hour == 0


def test_epoch_milliseconds() -> None:
    event = parse_transaction(tx_bytes(timestamp=T0_S * 1000 + 123))
    assert event.event_time_s == pytest.approx(T0_S + 0.123, abs=1e-6)
    assert event.timestamp.isoformat() == "2018-04-01T00:03:12.123000+00:00"


def test_integer_ids_become_strings() -> None:
    event = parse_transaction(tx_bytes(transaction_id=0, customer_id=4211, terminal_id=88))
    assert (event.transaction_id, event.customer_id, event.terminal_id) == ("0", "4211", "88")


def test_unknown_fields_are_kept_but_not_fields() -> None:
    event = parse_transaction(tx_bytes(merchant="ACME", tx_fraud_scenario=2))
    assert event.model_extra == {"merchant": "ACME", "tx_fraud_scenario": 2}
    assert "merchant" not in TransactionEvent.model_fields


@pytest.mark.parametrize(("given_currency", "expected"), [("EUR", "EUR"), (None, None)])
def test_currency(given_currency: str | None, expected: str | None) -> None:
    assert parse_transaction(tx_bytes(currency=given_currency)).currency == expected


@pytest.mark.parametrize(("amount", "expected"), [(0, 0.0), (-0.0, 0.0), (12, 12.0), (1e9, 1e9)])
def test_amount_edges(amount: float, expected: float) -> None:
    parsed = parse_transaction(tx_bytes(amount=amount)).amount
    assert parsed == expected
    assert str(parsed) == str(expected)  # -0.0 comes out as 0.0, an int as a float


def test_identifier_of_exactly_the_maximum_length() -> None:
    assert parse_transaction(tx_bytes(transaction_id="x" * 64)).transaction_id == "x" * 64


def test_label_accepts_every_form_and_keeps_the_keys() -> None:
    label = parse_label(label_bytes(customer_id=7, event_time=T0_S * 1000, is_fraud=False))
    assert label == Label(
        transaction_id="tx-1",
        customer_id="7",
        terminal_id="t-1",
        is_fraud=False,
        event_time=datetime(2018, 4, 1, 0, 3, 12, tzinfo=UTC),
        reported_at=datetime(2018, 4, 3, 10, tzinfo=UTC),
    )
    assert label.event_time_s == T0_S
    assert label.reported_at_s == datetime(2018, 4, 3, 10, tzinfo=UTC).timestamp()


def test_a_valid_event_through_the_stdlib_fallback_is_not_accepted_twice() -> None:
    # Same payload with and without a NaN in an unknown field: only the strict one passes.
    assert parse_transaction(tx_bytes(extra=1.0)).model_extra == {"extra": 1.0}
    with pytest.raises(RejectedEvent) as caught:
        parse_transaction(tx_bytes(extra=float("nan")))
    assert caught.value.reason is RejectReason.NOT_JSON
    assert "NaN" in caught.value.detail


# ---------------------------------------------------------------------------------------
# Arbitrary input: the parsers reject, they never crash.

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: json.dumps writes them as bare literals
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
field_names = st.sampled_from([*TX, *LABEL, "currency"]) | st.text(max_size=8)
near_events = st.dictionaries(field_names, json_values, max_size=8).map(
    lambda doc: json.dumps(doc).encode()
)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | near_events)
def test_arbitrary_bytes_only_ever_raise_rejected_event(raw: bytes) -> None:
    for parse in (parse_transaction, parse_label):
        try:
            parse(raw)
        except RejectedEvent as exc:
            assert exc.reason in RejectReason
            assert len(exc.detail) < 300


# ---------------------------------------------------------------------------------------
# Score records.


def score_record(**changes: Any) -> ScoreRecord:
    fields: dict[str, Any] = {
        "transaction_id": "tx-1",
        "customer_id": "c-1",
        "terminal_id": "t-1",
        "amount": 57.16,
        "event_time": "2018-04-01T00:03:12.000Z",
        "score": 0.93,
        "decision": Decision.DECLINE,
        "reasons": ["amount 9x the customer's 7-day mean", "new terminal"],
        "model_version": "lstm-2024-05-01",
        "scored_at": "2024-05-02T10:11:12.345Z",
    }
    return ScoreRecord(**{**fields, **changes})


def test_score_record_round_trip() -> None:
    record = score_record()
    raw = record.to_json()
    assert ScoreRecord.from_json(raw) == record
    # to_json is hand-written for speed; it must say exactly what pydantic would.
    assert orjson.loads(raw) == record.model_dump(mode="json")
    assert orjson.loads(raw)["decision"] == "decline"


@pytest.mark.parametrize("score", [0.0, 1.0, 0.5])
def test_score_bounds_are_inclusive(score: float) -> None:
    assert ScoreRecord.from_json(score_record(score=score).to_json()).score == score


@pytest.mark.parametrize(
    "changes",
    [
        {"score": 1.0001},
        {"score": -0.1},
        {"score": float("nan")},
        {"amount": -1.0},
        {"decision": "maybe"},
        {"reasons": ["r"] * 6},
        {"reasons": ["r" * 121]},
        {"event_time": "2018-04-01T00:03:12Z"},  # no milliseconds
        {"scored_at": "2018-04-01T00:03:12.000+00:00"},  # not the Z form
        {"transaction_id": ""},
    ],
)
def test_score_record_refuses_out_of_contract_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        score_record(**changes)


def test_from_json_validates() -> None:
    doc = orjson.loads(score_record().to_json())
    with pytest.raises(ValidationError):
        ScoreRecord.from_json(orjson.dumps({**doc, "score": 2}))


def test_iso_utc_millis() -> None:
    assert iso_utc_millis(T0_S) == "2018-04-01T00:03:12.000Z"
    assert iso_utc_millis(T0_S + 0.5) == "2018-04-01T00:03:12.500Z"
    event = parse_transaction(tx_bytes(timestamp="2018-04-01T02:03:12.042+02:00"))
    assert iso_utc_millis(event.event_time_s) == "2018-04-01T00:03:12.042Z"


# ---------------------------------------------------------------------------------------
# Dead letters.


def test_dead_letter_headers() -> None:
    error = RejectedEvent(RejectReason.AMOUNT_NEGATIVE, "amount: -1.0 is below 0")
    headers = dead_letter_headers(error, "transactions", 3, 1234, failed_at_s=T0_S + 0.5)
    assert headers == [
        ("dlq.reason", b"amount_negative"),
        ("dlq.detail", b"amount: -1.0 is below 0"),
        ("dlq.source.topic", b"transactions"),
        ("dlq.source.partition", b"3"),
        ("dlq.source.offset", b"1234"),
        ("dlq.failed_at", b"2018-04-01T00:03:12.500Z"),
    ]
    assert DeadLetterHeaders.REASON == "dlq.reason"


def test_dead_letter_headers_default_to_now_and_survive_odd_details() -> None:
    error = RejectedEvent(RejectReason.NOT_JSON, "lone surrogate \ud800")
    headers = dict(dead_letter_headers(error, "labels", 0, 0))
    assert headers[DeadLetterHeaders.DETAIL] == b"lone surrogate \\ud800"
    failed_at = datetime.fromisoformat(headers[DeadLetterHeaders.FAILED_AT].decode())
    assert abs(failed_at.timestamp() - time.time()) < 60


# ---------------------------------------------------------------------------------------
# JSON Schemas.


def test_committed_schemas_match_the_models() -> None:
    stale = [
        name
        for name, schema in json_schemas().items()
        if (JSON_SCHEMA_DIR / name).read_text(encoding="utf-8") != render_json_schema(schema)
    ]
    assert not stale, f"regenerate with `python -m stream_app.records`: {stale}"


def test_write_json_schemas(tmp_path: Path) -> None:
    written = write_json_schemas(tmp_path / "out")
    assert sorted(p.name for p in written) == [
        "control.schema.json",
        "label.schema.json",
        "score_record.schema.json",
        "transaction_event.schema.json",
    ]
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n")
        assert json.loads(text) == json_schemas()[path.name]


def test_schemas_agree_with_the_parsers() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = json_schemas()
    tx_schema = jsonschema.Draft202012Validator(schemas["transaction_event.schema.json"])
    tx_schema.validate(json.loads(tx_bytes(customer_id=4211, currency="EUR", merchant="x")))
    assert not tx_schema.is_valid(json.loads(tx_bytes(amount=-1)))
    assert not tx_schema.is_valid(json.loads(tx_bytes(amount=...)))
    label_schema = jsonschema.Draft202012Validator(schemas["label.schema.json"])
    label_schema.validate(LABEL)
    assert not label_schema.is_valid({**LABEL, "is_fraud": 1})
    score_schema = jsonschema.Draft202012Validator(schemas["score_record.schema.json"])
    score_schema.validate(orjson.loads(score_record(reasons=[]).to_json()))
    assert not score_schema.is_valid({**orjson.loads(score_record().to_json()), "score": 1.5})
    assert DEFAULT_LIMITS.max_payload_bytes == 16 * 1024


def test_the_contract_module_writes_transactions_and_labels_the_parsers_read_back() -> None:
    event = parse_transaction(transaction_json(17, 7, 2, T0_S * 1000, 20.5))
    assert (event.transaction_id, event.customer_id, event.terminal_id) == ("17", "7", "2")
    assert (event.amount, event.event_time_s) == (20.5, T0_S)
    label = parse_label(label_json(17, 7, 2, T0_S * 1000, True, (T0_S + 60) * 1000))
    assert (label.transaction_id, label.customer_id, label.terminal_id) == ("17", "7", "2")
    assert (label.is_fraud, label.event_time_s, label.reported_at_s) == (True, T0_S, T0_S + 60)


def test_records_are_written_only_by_the_contract_module() -> None:
    # A dict with a "transaction_id" key, outside records.py, is a record written by hand:
    # the JSON of ScoreRecord, TransactionEvent and Label has one writer each.
    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"""["']transaction_id["']\s*:""")
    written_by_hand = [
        f"{path.relative_to(root)}:{number}"
        for package in ("stream_app", "training")
        for path in sorted((root / package).rglob("*.py"))
        if path != root / "stream_app" / "records.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not written_by_hand, written_by_hand
