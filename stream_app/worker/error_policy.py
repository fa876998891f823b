"""The worker's error policy, stage by stage: the one written definition of what it does.

Each :class:`Rule` says, for one kind of failure at one stage of an event's way through the
worker (start-up, consume, validate, state, score, publish, commit), whether it is
*retried* (with :class:`~stream_app.backoff.Backoff`: capped exponential pauses, a warning
at each try, a "still waiting" line after :data:`~stream_app.backoff.STILL_WAITING_AFTER_S`,
``fraudstream_ready`` 0 meanwhile, nothing committed past it), *dead-lettered* (the
message's original bytes with ``dlq.*`` headers naming the reason and its source topic,
partition and offset; the rest of the batch goes on), *fatal* (the worker stops with an
exit code and a message naming what to fix) or *recovered* in place (logged and counted).
The table describes what the code does; the code stays where it is, and each rule names it
(``where``). ``tests/stream_app/worker/test_error_policy.py`` keeps the two together: every
rejection reason has its rule, every metric and alert named exists, every log line quoted is
in the code named, and a Kafka error no retry can fix says what the operator must do. The
README's table is rendered from here (:func:`policy_table`, ``python -m
training.readme_tables``).

What is wrong with one event is dead-lettered, and the rest of its batch goes on. What
stops the worker is configuration (exit code 2, before anything is consumed) or a fault
that makes going on unsafe or that no retry changes (exit code 1, with what to fix; the
restart re-processes from the last commit): a Kafka error of
:data:`~stream_app.backoff.FATAL_KAFKA_ERRORS` is never retried.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from aiokafka.errors import (
    CommitFailedError,
    GroupAuthorizationFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    ProducerFenced,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
)
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from stream_app.backoff import STILL_WAITING_AFTER_S, STILL_WAITING_EVERY_S
from stream_app.errors import (
    STATE_REASONS,
    VALIDATION_REASONS,
    ConfigError,
    FraudStreamError,
    ModelError,
    RejectReason,
)


class Stage(enum.StrEnum):
    """Where on an event's way through the worker a failure happens."""

    START = "start-up"
    CONSUME = "consume"
    VALIDATE = "validate"
    STATE = "state"
    SCORE = "score"
    PUBLISH = "publish"
    COMMIT = "commit"


class Handling(enum.StrEnum):
    """What the worker does about a failure, in one word."""

    RETRIED = "retried"
    DEAD_LETTERED = "dead-lettered"
    FATAL = "fatal"
    RECOVERED = "recovered"


@dataclass(frozen=True)
class Rule:
    """One kind of failure at one stage, and what the worker and the operator see.

    Args:
        stage: Where it happens.
        error: What went wrong, in an operator's words.
        handling: Retried, dead-lettered, fatal or recovered.
        action: What the worker does about it.
        where: The code that does it, as ``module:qualified.name``.
        log: The level and a literal part of the line the worker logs for it (``None``:
            none of its own; a dead letter's headers say it instead).
        exceptions: The exception classes it arrives as, when it is one.
        reasons: The rejection reasons of its dead letters.
        metrics: Samples that count or show it (``name`` or ``name{label="value"}``).
        alert: The Prometheus alert that fires on it, if one does.
        exit_code: The worker's exit code, for a fatal rule.
        backoff: Retried by :class:`~stream_app.backoff.Backoff`: the operation's name in
            its retry lines (``<name> failed (<error>); retrying in <s> s``).
        fix: What the operator must change, when no retry can heal it.
    """

    stage: Stage
    error: str
    handling: Handling
    action: str
    where: tuple[str, ...]
    log: tuple[str, str] | None = None
    exceptions: tuple[type[BaseException], ...] = ()
    reasons: tuple[RejectReason, ...] = ()
    metrics: tuple[str, ...] = ()
    alert: str | None = None
    exit_code: int | None = None
    backoff: str | None = None
    fix: str | None = None


_LOOP: Final = "stream_app.worker.loop:ScoringLoop"
_KAFKA_DOWN: Final = "a broker unreachable, a leader moving, a request timing out"

POLICY: Final[tuple[Rule, ...]] = (
    # --- start-up: what no retry can fix stops the worker before it consumes anything ----
    Rule(
        Stage.START,
        "a setting is invalid or missing",
        Handling.FATAL,
        "stops before connecting to anything",
        ("stream_app.cli:worker_command", "stream_app.cli:fail"),
        ("stderr", "error:"),
        exceptions=(ConfigError,),
        exit_code=2,
        fix="the setting the message names",
    ),
    Rule(
        Stage.START,
        "the champion model cannot serve (missing, bad card, checksum, feature version)",
        Handling.FATAL,
        "stops before connecting to anything",
        ("stream_app.cli:worker_command",),
        ("stderr", "the worker needs a model"),
        exceptions=(ModelError,),
        exit_code=2,
        fix="FRAUDSTREAM_MODEL_DIR, or the model directory it names",
    ),
    Rule(
        Stage.START,
        "Kafka unreachable",
        Handling.RETRIED,
        "waits for it: Kafka may come up later",
        ("stream_app.worker.app:prepare",),
        exceptions=(KafkaConnectionError, OSError),
        metrics=('fraudstream_kafka_errors_total{operation="admin"}',),
        backoff="connecting to Kafka at",
    ),
    Rule(
        Stage.START,
        "Kafka refuses what no retry changes: credentials, certificate, an ACL, a missing "
        "topic with topic creation off, a session timeout outside the brokers' range, a "
        "producer the broker cannot initialise",
        Handling.FATAL,
        "stops before consuming anything",
        ("stream_app.kafka.preflight:check", "stream_app.cli:fail"),
        ("stderr", "error:"),
        exceptions=(ConfigError,),
        exit_code=2,
        fix="the setting or ACL the message names",
    ),
    Rule(
        Stage.START,
        "Redis unreachable",
        Handling.RETRIED,
        "waits for it",
        ("stream_app.worker.app:prepare",),
        exceptions=(RedisError, OSError),
        metrics=("fraudstream_redis_errors_total",),
        backoff="connecting to Redis at",
    ),
    Rule(
        Stage.START,
        "Redis refuses the password or its certificate, or is (not) a cluster node "
        "against FRAUDSTREAM_REDIS_CLUSTER",
        Handling.FATAL,
        "stops before consuming anything",
        ("stream_app.worker.app:ping_redis",),
        ("stderr", "refused the credentials"),
        exceptions=(ConfigError,),
        exit_code=2,
        fix="the Redis setting the message names",
    ),
    Rule(
        Stage.START,
        "a dead-letter topic cannot take the largest message accepted (its max.message.bytes "
        "below FRAUDSTREAM_MAX_PAYLOAD_BYTES plus 4 KiB of headers)",
        Handling.FATAL,
        "stops before consuming anything",
        ("stream_app.kafka.preflight:check_dead_letter_room",),
        ("stderr", "accepts messages of up to"),
        exceptions=(ConfigError,),
        exit_code=2,
        fix="raise the topic's max.message.bytes, or lower FRAUDSTREAM_MAX_PAYLOAD_BYTES, as "
        "the message says",
    ),
    Rule(
        Stage.START,
        "the metrics address cannot be bound",
        Handling.FATAL,
        "stops before consuming anything",
        ("stream_app.worker.app:start_metrics_server",),
        ("stderr", "cannot serve metrics on"),
        exceptions=(ConfigError,),
        exit_code=2,
        fix="FRAUDSTREAM_METRICS_PORT",
    ),
    # --- consume --------------------------------------------------------------------------
    Rule(
        Stage.CONSUME,
        f"a poll fails ({_KAFKA_DOWN})",
        Handling.RETRIED,
        "polls again after a pause that grows like every retry's; not ready until a poll "
        "succeeds; what was polled is not lost (nothing committed)",
        (f"{_LOOP}.run",),
        ("WARNING", "polling transactions failed"),
        exceptions=(KafkaError,),
        metrics=('fraudstream_kafka_errors_total{operation="consume"}', "fraudstream_ready"),
        alert="FraudstreamKafkaErrors",
    ),
    Rule(
        Stage.CONSUME,
        "the worker may no longer read an input topic or its group (an ACL was removed)",
        Handling.FATAL,
        "stops: no retry changes it; the restart's start-up checks name the missing ACL",
        (f"{_LOOP}.run", "stream_app.backoff:fatal_kafka_error"),
        ("ERROR", "which no retry changes"),
        exceptions=(TopicAuthorizationFailedError, GroupAuthorizationFailedError),
        metrics=('fraudstream_kafka_errors_total{operation="consume"}',),
        alert="FraudstreamWorkerDown",
        exit_code=1,
        fix="restore the worker principal's Read ACL on the input topics and its group",
    ),
    Rule(
        Stage.CONSUME,
        "an input partition has no committed offset (a new consumer group)",
        Handling.RECOVERED,
        "reads it from its beginning (labels: from where the former labels group committed)",
        ("stream_app.worker.offsets:Offsets.start_uncommitted",),
        exceptions=(NoOffsetForPartitionError,),
    ),
    Rule(
        Stage.CONSUME,
        "an input offset is out of range (the topic deleted and re-created, or truncated)",
        Handling.RECOVERED,
        "FRAUDSTREAM_OFFSET_RESET_POLICY earliest or latest: re-reads the partition from "
        "its start, or skips to its end",
        ("stream_app.worker.offsets:Offsets.reset",),
        ("ERROR", "is out of range: the partition now holds offsets"),
        exceptions=(OffsetOutOfRangeError,),
        metrics=("fraudstream_offset_resets_total",),
    ),
    Rule(
        Stage.CONSUME,
        "an input offset is out of range, with FRAUDSTREAM_OFFSET_RESET_POLICY=fail",
        Handling.FATAL,
        "stops once the batches before it are committed",
        (
            "stream_app.worker.offsets:Offsets.reset",
            "stream_app.worker.app:ScoringService._guarded",
        ),
        ("ERROR", "stopping, as FRAUDSTREAM_OFFSET_RESET_POLICY"),
        exceptions=(OffsetOutOfRangeError, FraudStreamError),
        metrics=("fraudstream_offset_resets_total",),
        alert="FraudstreamWorkerDown",
        exit_code=1,
        fix="FRAUDSTREAM_OFFSET_RESET_POLICY earliest or latest, once the topic is checked",
    ),
    Rule(
        Stage.CONSUME,
        "the partitions were reassigned while a poll was under way",
        Handling.RECOVERED,
        "drops what it polled and re-reads from the committed offsets",
        (f"{_LOOP}.run",),
        ("INFO", "a rebalance ran during a poll"),
    ),
    Rule(
        Stage.CONSUME,
        "the controls topic cannot be read (at start-up, before any scoring)",
        Handling.RETRIED,
        "waits for it: a restarted worker must not approve a blocked card",
        (f"{_LOOP}.start",),
        exceptions=(KafkaError,),
        metrics=('fraudstream_kafka_errors_total{operation="consume"}',),
        backoff="reading the controls topic",
    ),
    Rule(
        Stage.CONSUME,
        "the controls topic cannot be read (while running)",
        Handling.RETRIED,
        "keeps the controls in force and reads again every few seconds",
        ("stream_app.scoring.controls:ControlsFeed.run",),
        ("WARNING", "reading the controls topic failed"),
        exceptions=(KafkaError,),
        metrics=('fraudstream_kafka_errors_total{operation="consume"}',),
    ),
    Rule(
        Stage.CONSUME,
        "a record of the controls topic is invalid",
        Handling.RECOVERED,
        "ignores it (every worker reads it, so it is not dead-lettered)",
        ("stream_app.scoring.controls:ControlsFeed._apply",),
        ("ERROR", "record ignored"),
        metrics=('fraudstream_controls_total{outcome="invalid"}',),
    ),
    # --- validate: a bad message is never fatal and never silent ---------------------------
    Rule(
        Stage.VALIDATE,
        "a transaction or a label breaks the event contract",
        Handling.DEAD_LETTERED,
        "publishes its original bytes to transactions.dlq (labels: labels.dlq) with the "
        "reason and the source topic, partition and offset; the rest of the batch goes on",
        (
            "stream_app.scoring.pipeline:validate_transaction",
            "stream_app.scoring.pipeline:apply_labels",
        ),
        reasons=VALIDATION_REASONS,
        metrics=(
            'fraudstream_events_total{outcome="dead_letter"}',
            'fraudstream_labels_total{outcome="dead_letter"}',
            "fraudstream_dead_letters_total",
        ),
        alert="FraudstreamDeadLetterRateHigh",
    ),
    # --- state ------------------------------------------------------------------------------
    Rule(
        Stage.STATE,
        "a Redis call fails (connection lost, timeout, failover, out of memory; on a Redis "
        "Cluster, a write its replicas did not confirm)",
        Handling.RETRIED,
        "retries the batch's state call; the state recognises what was already applied",
        (f"{_LOOP}._state_of",),
        exceptions=(RedisError,),
        metrics=("fraudstream_redis_errors_total",),
        alert="FraudstreamRedisErrors",
        backoff="updating state in Redis",
    ),
    Rule(
        Stage.STATE,
        "Redis refuses the worker's credentials or an ACL while it runs (a password rotated, "
        "a user removed or its permissions changed)",
        Handling.FATAL,
        "stops with the batch uncommitted (nothing lost): no retry changes it; the restart's "
        "start-up check names the setting",
        (f"{_LOOP}._state_of", "stream_app.backoff:fatal_error"),
        ("ERROR", "which no retry changes"),
        exceptions=(AuthenticationError, NoPermissionError),
        metrics=("fraudstream_redis_errors_total",),
        alert="FraudstreamWorkerDown",
        exit_code=1,
        fix="set FRAUDSTREAM_REDIS_URL (or FRAUDSTREAM_REDIS_PASSWORD) to the current "
        "credentials, or restore the Redis user's ACL",
    ),
    Rule(
        Stage.STATE,
        "a transaction id already used for another transaction",
        Handling.DEAD_LETTERED,
        "publishes it to transactions.dlq; no score record, no state change",
        ("stream_app.worker.outputs:OutputRecords.refused",),
        ("WARNING", "refused (%s): dead-lettered"),
        reasons=(RejectReason.CONFLICTING_DUPLICATE,),
        metrics=('fraudstream_dead_letters_total{reason="conflicting_duplicate"}',),
        alert="FraudstreamTransactionIdReused",
    ),
    Rule(
        Stage.STATE,
        "a label whose transaction was scored with another customer, terminal or time",
        Handling.DEAD_LETTERED,
        "publishes it to labels.dlq; the terminal's counters do not change",
        ("stream_app.scoring.pipeline:apply_labels",),
        reasons=(RejectReason.LABEL_MISMATCH,),
        metrics=('fraudstream_dead_letters_total{reason="label_mismatch"}',),
        alert="FraudstreamLabelsUnmatched",
    ),
    Rule(
        Stage.STATE,
        "a label whose transaction does not come within FRAUDSTREAM_LABEL_WAIT_S",
        Handling.DEAD_LETTERED,
        "keeps it waiting, then publishes it to labels.dlq",
        ("stream_app.scoring.pipeline:expired_labels", "stream_app.worker.app:build_app"),
        ("WARNING", "label(s) dead-lettered"),
        reasons=(RejectReason.LABEL_UNKNOWN_TRANSACTION,),
        metrics=('fraudstream_dead_letters_total{reason="label_unknown_transaction"}',),
        alert="FraudstreamLabelsUnmatched",
    ),
    Rule(
        Stage.STATE,
        "dead-lettering the expired labels fails (Redis or Kafka)",
        Handling.RETRIED,
        "tries again at the next sweep; the labels keep waiting meanwhile",
        ("stream_app.worker.app:build_app",),
        ("WARNING", "dead-lettering expired labels failed"),
        exceptions=(RedisError, KafkaError),
        metrics=(
            "fraudstream_redis_errors_total",
            'fraudstream_kafka_errors_total{operation="produce"}',
        ),
    ),
    Rule(
        Stage.STATE,
        "a state key of another type or size than the worker writes",
        Handling.RECOVERED,
        "renames it <key>:quarantined and scores the events it concerned from empty state",
        ("stream_app.state.redis:_log_quarantine",),
        ("ERROR", "was corrupt (wrong type or size)"),
        metrics=("fraudstream_state_quarantined_total",),
        alert="FraudstreamStateQuarantined",
    ),
    Rule(
        Stage.STATE,
        "Redis lost the deployment's state (its state marker gone, of another epoch or gone back)",
        Handling.RECOVERED,
        "keeps scoring, flagged, until `fraudstream rebuild-state` has run",
        ("stream_app.state.guard:StateGuard._lose",),
        ("ERROR", "STATE LOST"),
        metrics=("fraudstream_state_lost", "fraudstream_ready"),
        alert="FraudstreamStateLost",
        fix="run `fraudstream rebuild-state` (see the runbook)",
    ),
    # --- score ------------------------------------------------------------------------------
    Rule(
        Stage.SCORE,
        "the model gives no probability for an event (not finite, outside [0, 1], or the "
        "model call fails on it)",
        Handling.DEAD_LETTERED,
        "bisects the batch to the events at fault, publishes them to transactions.dlq and "
        "scores the rest",
        (
            "stream_app.scoring.pipeline:checked_scores",
            "stream_app.worker.outputs:OutputRecords.refused",
        ),
        ("WARNING", "refused (%s): dead-lettered"),
        reasons=(RejectReason.UNSCORABLE,),
        metrics=(
            'fraudstream_events_total{outcome="unscorable"}',
            'fraudstream_dead_letters_total{reason="unscorable"}',
        ),
        alert="FraudstreamDeadLetterRateHigh",
    ),
    Rule(
        Stage.SCORE,
        "a new model directory is refused at hot reload (bad card, checksum, probe scores, "
        "unreadable)",
        Handling.RECOVERED,
        "keeps serving the previous model and goes on watching",
        ("stream_app.models.registry:ModelRegistry._refuse",),
        ("ERROR", "refused the %s model at %s"),
        metrics=('fraudstream_model_reloads_total{outcome="refused"}',),
        alert="FraudstreamModelReloadRefused",
        fix="re-export the model and point the worker at the new directory",
    ),
    Rule(
        Stage.SCORE,
        "any other error in the loop (a bug)",
        Handling.FATAL,
        "stops; the restart re-processes from the last commit",
        ("stream_app.worker.app:ScoringService._guarded",),
        ("ERROR", "the scoring loop failed; stopping the worker"),
        exceptions=(Exception,),
        alert="FraudstreamWorkerDown",
        exit_code=1,
    ),
    # --- publish ----------------------------------------------------------------------------
    Rule(
        Stage.PUBLISH,
        f"outputs are not acknowledged ({_KAFKA_DOWN})",
        Handling.RETRIED,
        "sends the batch's outputs again (identical records); commits nothing meanwhile",
        (f"{_LOOP}._acknowledged", f"{_LOOP}._score_and_send"),
        exceptions=(KafkaError,),
        metrics=('fraudstream_kafka_errors_total{operation="produce"}',),
        alert="FraudstreamKafkaErrors",
        backoff="publishing outputs",
    ),
    Rule(
        Stage.PUBLISH,
        "an output topic does not exist (deleted while running)",
        Handling.RETRIED,
        "holds the batch, uncommitted, and sends it again once the topic is back",
        (
            "stream_app.worker.output_topics:OutputTopics.check_exist",
            "stream_app.worker.output_topics:OutputTopics.watch",
            f"{_LOOP}._acknowledged",
        ),
        ("ERROR", "do not exist"),
        exceptions=(UnknownTopicOrPartitionError,),
        metrics=('fraudstream_kafka_errors_total{operation="produce"}', "fraudstream_ready"),
        alert="FraudstreamNoOffsetCommitted",
        backoff="publishing outputs",
        fix="re-create the topic, or fix the setting the error names",
    ),
    Rule(
        Stage.PUBLISH,
        "the worker may no longer write an output topic or use its transactional id (an "
        "ACL was removed)",
        Handling.FATAL,
        "stops with the batch uncommitted: no retry changes it; the restart's start-up "
        "checks name the missing ACL",
        (f"{_LOOP}._acknowledged", "stream_app.backoff:fatal_kafka_error"),
        ("ERROR", "which no retry changes"),
        exceptions=(TopicAuthorizationFailedError, TransactionalIdAuthorizationFailed),
        metrics=('fraudstream_kafka_errors_total{operation="produce"}',),
        alert="FraudstreamWorkerDown",
        exit_code=1,
        fix="restore the worker principal's Write ACL on the output topics and Write and "
        "Describe on its transactional id",
    ),
    Rule(
        Stage.PUBLISH,
        "the broker refuses an output as too large (a dead-letter topic's max.message.bytes "
        "lowered after start-up)",
        Handling.FATAL,
        "stops with the batch uncommitted (nothing lost): no retry changes it; the restart "
        "stops at start-up, naming the topic and its limit",
        (f"{_LOOP}._acknowledged", "stream_app.backoff:fatal_kafka_error"),
        ("ERROR", "which no retry changes"),
        exceptions=(MessageSizeTooLargeError,),
        metrics=('fraudstream_kafka_errors_total{operation="produce"}',),
        alert="FraudstreamWorkerDown",
        exit_code=1,
        fix="keep FRAUDSTREAM_MAX_PAYLOAD_BYTES a few KiB below the dead-letter topics' "
        "max.message.bytes",
    ),
    Rule(
        Stage.PUBLISH,
        "exactly-once: another worker took this worker's transactional id",
        Handling.FATAL,
        "stops: two workers share FRAUDSTREAM_INSTANCE_ID",
        (f"{_LOOP}._transaction", "stream_app.worker.app:ScoringService._guarded"),
        ("ERROR", "this worker's producer was fenced"),
        exceptions=(ProducerFenced,),
        alert="FraudstreamWorkerDown",
        exit_code=1,
        fix="give every replica its own FRAUDSTREAM_INSTANCE_ID",
    ),
    # --- commit -----------------------------------------------------------------------------
    Rule(
        Stage.COMMIT,
        f"committing offsets fails ({_KAFKA_DOWN})",
        Handling.RETRIED,
        "commits again; the outputs are already acknowledged",
        (f"{_LOOP}._commit",),
        exceptions=(KafkaError,),
        metrics=('fraudstream_kafka_errors_total{operation="commit"}',),
        alert="FraudstreamNoOffsetCommitted",
        backoff="committing offsets",
    ),
    Rule(
        Stage.COMMIT,
        "the partitions moved to another member before the commit",
        Handling.RECOVERED,
        "does not commit: the new owner re-processes the batch (identical records)",
        (f"{_LOOP}._commit",),
        ("WARNING", "offsets not committed, partitions were reassigned"),
        exceptions=(CommitFailedError, IllegalStateError),
        metrics=('fraudstream_kafka_errors_total{operation="commit"}',),
    ),
    Rule(
        Stage.COMMIT,
        "exactly-once: the batch is stale (the worker stalled past half its session, the "
        "batch outlived the session, or the group refused its generation)",
        Handling.RECOVERED,
        "aborts the Kafka transaction and re-reads from the committed offsets",
        (f"{_LOOP}._rewind",),
        ("WARNING", "batch aborted, not committed"),
        metrics=('fraudstream_kafka_errors_total{operation="commit"}',),
    ),
    Rule(
        Stage.COMMIT,
        "exactly-once: the Kafka transaction fails to commit",
        Handling.RETRIED,
        "aborts it and sends the batch again in a new transaction",
        (f"{_LOOP}._score_and_send",),
        exceptions=(KafkaError,),
        metrics=('fraudstream_kafka_errors_total{operation="produce"}',),
        alert="FraudstreamKafkaErrors",
        backoff="publishing a transaction",
    ),
)

# Every rejection reason's rule: the validation reasons and those the state or model give.
REASONS_COVERED: Final = (*VALIDATION_REASONS, *STATE_REASONS)


def _operator_view(rule: Rule) -> str:
    """What the operator sees of a rule: the log line, metrics, alert, exit code, fix."""
    parts: list[str] = []
    if rule.log is not None:
        level, text = rule.log
        parts.append(f"{level} `{text.replace('%s', '…')}`")
    if rule.backoff is not None:
        parts.append(f"WARNING `{rule.backoff} … failed (…); retrying in … s`")
    if rule.reasons:
        parts.append("dead letters with `dlq.reason` " + ", ".join(f"`{r}`" for r in rule.reasons))
    parts += [f"`{m}`" for m in rule.metrics]
    if rule.alert:
        parts.append(f"alert {rule.alert}")
    if rule.exit_code is not None:
        parts.append(f"exit code {rule.exit_code}")
    if rule.fix:
        parts.append(f"fix: {rule.fix}")
    return "; ".join(parts) or "-"


def policy_table() -> str:
    """The README's error-policy section: a note on retries, then one row per rule."""
    note = (
        "*Retried* means with capped exponential backoff (from 0.1 s, doubling up to "
        "`FRAUDSTREAM_RETRY_BACKOFF_MAX_S`): a WARNING at each try, a `still waiting` line "
        f"after {STILL_WAITING_AFTER_S:.0f} s and every {STILL_WAITING_EVERY_S:.0f} s after, "
        "`fraudstream_ready` 0 meanwhile, and no offset committed past the batch; a poll is "
        "retried the same way, and a Kafka error no retry changes (an ACL removed, a record "
        "too large) is never retried: it is fatal. *Dead-lettered* means the original "
        "bytes go to the "
        "dead-letter topic with the headers `dlq.reason`, `dlq.detail` and `dlq.source.*` "
        "(topic, partition, offset), and the rest of the batch goes on. *Fatal* stops the "
        "worker with the exit code shown (2: fix the configuration; 1: restart it, and it "
        "re-processes from its last commit). *Recovered* is handled in place, logged and "
        "counted."
    )
    rows = [
        "| Stage | Failure | Handling | What the worker does | What the operator sees |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rule in POLICY:
        cells = (rule.stage, rule.error, rule.handling, rule.action, _operator_view(rule))
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return note + "\n\n" + "\n".join(rows)
