"""Operators' controls in the real worker: block and allow lists and threshold overrides.

A supervisor's change reaches every running worker through the controls topic, with no
restart: a blocked terminal's transactions are declined and an allowed customer's approved,
each record saying which list decided and who put the subject there; a threshold override
changes the champion's cut-offs. Lifting a control restores the model's decisions, and a
worker started later applies the controls in force before it scores anything. Both broker
lanes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from stream_app.config import Settings
from stream_app.models.card import Thresholds, load_card
from stream_app.records import Control, Decision, ScoreRecord
from stream_app.scoring.decisions import decide
from tests.kafka_fixtures import Dataset
from tests.resilience_helpers import (
    Message,
    publish,
    read_records,
    score_records,
    transaction_ids,
    transaction_messages,
)
from training.ops.services.worker_process import WorkerProcess

pytestmark = [pytest.mark.integration]

# A change must be in force within this long of its publication.
APPLIED_WITHIN_S = 5.0


def control_message(settings: Settings, **fields: object) -> Message:
    """A control as the console publishes it: keyed by its key, at the current time."""
    control = Control.model_validate(
        {"changed_by": "sue", "changed_at": datetime.now(UTC), **fields}
    )
    return Message(settings.topic_controls, control.key.encode(), control.to_json())


def terminal_block(
    settings: Settings, terminal: str, *, active: bool = True, note: str = ""
) -> Message:
    """Put ``terminal`` on the block list (or lift it), as sue."""
    return control_message(
        settings, action="block", active=active, subject="terminal", subject_id=terminal, note=note
    )


def wait_in_force(worker: WorkerProcess, expected: dict[str, float]) -> float:
    """Seconds until ``fraudstream_controls_in_force`` shows ``expected`` (by kind)."""
    started = time.monotonic()
    while time.monotonic() - started < 30:
        samples = worker.scrape()
        if all(
            samples.get(f'fraudstream_controls_in_force{{kind="{kind}"}}') == value
            for kind, value in expected.items()
        ):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"controls not in force after 30 s: {expected}\n{worker.log()}")


def records_of(settings: Settings, messages: Sequence[Message]) -> dict[str, ScoreRecord]:
    """The score record of each transaction in ``messages``, by id."""
    ids = transaction_ids(messages)
    records = score_records(read_records(settings, settings.topic_scores, ids=ids))
    return {r.transaction_id: r for r in records if r.transaction_id in set(ids)}


def test_lists_and_overrides_apply_within_seconds_without_a_restart(
    make_settings: Callable[..., Settings],
    served_model: Path,
    small_transactions: Dataset,
    tmp_path: Path,
) -> None:
    settings = make_settings(model_dir=served_model)
    card = load_card(served_model)
    messages = transaction_messages(small_transactions.frame, settings, limit=900)
    first, second, third = messages[:500], messages[500:700], messages[700:]
    frame = small_transactions.frame.iloc[:500]
    terminals = Counter(frame["TERMINAL_ID"].astype(str))
    blocked = terminals.most_common(1)[0][0]
    allowed = next(
        str(c)
        for c, rows in frame.groupby("CUSTOMER_ID")
        if len(rows) >= 3 and blocked not in set(rows["TERMINAL_ID"].astype(str))
    )
    override = Thresholds(review=0.0, decline=1.0)  # every unlisted transaction reviewed

    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        version = next(
            k.split('version="')[1].split('"')[0]
            for k in worker.scrape()
            if k.startswith("fraudstream_model_info{") and 'role="champion"' in k
        )
        publish(
            settings,
            [
                terminal_block(settings, blocked, note="skimmer found"),
                control_message(
                    settings, action="allow", active=True, subject="customer", subject_id=allowed
                ),
                control_message(
                    settings,
                    action="thresholds",
                    active=True,
                    model_version=version,
                    review_threshold=override.review,
                    decline_threshold=override.decline,
                ),
            ],
        )
        took = wait_in_force(worker, {"block_terminal": 1, "allow_customer": 1, "thresholds": 1})
        print(f"controls in force {took:.2f} s after publication")
        assert took < APPLIED_WITHIN_S
        publish(settings, first)
        worker.wait_for("fraudstream_offsets_committed_total", len(first), 120)
        listed = worker.scrape()

        # Lift the block and the override: the model's own decisions again.
        publish(
            settings,
            [
                terminal_block(settings, blocked, active=False),
                control_message(settings, action="thresholds", active=False, model_version=version),
            ],
        )
        wait_in_force(worker, {"block_terminal": 0, "allow_customer": 1, "thresholds": 0})
        publish(settings, second)
        worker.wait_for("fraudstream_offsets_committed_total", len(first) + len(second), 120)

        # Block again, then stop: a worker started later must apply it before scoring.
        publish(settings, [terminal_block(settings, blocked, note="second skimmer")])
        wait_in_force(worker, {"block_terminal": 1})
        assert worker.terminate() == 0, worker.log()
    publish(settings, third)
    with WorkerProcess(settings, tmp_path / "worker2.log").start() as restarted:
        restarted.wait_for("fraudstream_offsets_committed_total", len(third), 120)
        assert restarted.terminate() == 0, restarted.log()

    # While the lists and the override were in force.
    records = records_of(settings, first)
    assert len(records) == len(first)
    at_blocked = [r for r in records.values() if r.terminal_id == blocked]
    of_allowed = [r for r in records.values() if r.customer_id == allowed]
    others = [r for r in records.values() if r not in at_blocked and r not in of_allowed]
    assert at_blocked and of_allowed and others
    for record in at_blocked:
        assert record.decision is Decision.DECLINE
        assert record.reasons[0].startswith("terminal on block list since ")
        assert record.reasons[0].endswith(", by sue: skimmer found")
    # The score stays the model's: most blocked transactions looked harmless to it.
    assert min(r.score for r in at_blocked) < card.thresholds.review
    for record in of_allowed:
        assert record.decision is Decision.APPROVE
        assert record.reasons[0].startswith("customer on allow list since ")
    scores = np.array([r.score for r in others])
    assert [r.decision for r in others] == decide(scores, override)
    assert decide(scores, override) != decide(scores, card.thresholds)  # the override bit
    assert listed['fraudstream_list_decisions_total{list="block"}'] == len(at_blocked)
    assert listed['fraudstream_list_decisions_total{list="allow"}'] == len(of_allowed)

    # After lifting: the card's thresholds, no block; the allow entry still stands.
    lifted = records_of(settings, second)
    assert len(lifted) == len(second)
    for record in lifted.values():
        if record.customer_id == allowed:
            assert record.decision is Decision.APPROVE
            continue
        assert record.decision == decide(np.array([record.score]), card.thresholds)[0]
        assert not any("list since" in reason for reason in record.reasons)

    # Restarted with a block in force: applied from the first transaction on.
    restarted_records = records_of(settings, third)
    assert len(restarted_records) == len(third)
    again = [r for r in restarted_records.values() if r.terminal_id == blocked]
    assert again, "no transaction at the blocked terminal in the last part"
    for record in again:
        assert record.decision is Decision.DECLINE
        assert record.reasons[0].endswith(", by sue: second skimmer")


def test_an_invalid_control_is_skipped_and_counted(
    make_settings: Callable[..., Settings], served_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(model_dir=served_model)
    with WorkerProcess(settings, tmp_path / "worker.log").start() as worker:
        publish(
            settings,
            [
                Message(settings.topic_controls, b"x", b"{not json"),
                Message(settings.topic_controls, b"y", b'{"action": "block", "active": true}'),
                control_message(
                    settings, action="block", active=True, subject="customer", subject_id="42"
                ),
            ],
        )
        worker.wait_for('fraudstream_controls_total{outcome="applied"}', 1, 30)
        worker.wait_for('fraudstream_controls_total{outcome="invalid"}', 2, 30)
        assert worker.metric('fraudstream_controls_in_force{kind="block_customer"}') == 1
        assert worker.process is not None and worker.process.poll() is None
        log = worker.log()
        assert worker.terminate() == 0, log
    assert log.count("record ignored") == 2, log
