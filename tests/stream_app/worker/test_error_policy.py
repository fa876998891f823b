"""The error policy (``stream_app/worker/error_policy.py``) says what the code does, cheaply.

What can be checked without running a worker is: every rejection reason has the rule that
dead-letters it; every metric, alert and code location a rule names exists; every log line
it quotes is in the code it names, so a reworded or moved log line fails here; fatal rules
and only they have an exit code; and a Kafka error no retry can heal that the worker
retries tells the operator what to fix. The behaviour itself is tested where it happens
(``tests/stream_app/worker/``, ``tests/stream_app/kafka/test_topic_loss.py``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.errors import ClusterAuthorizationFailedError, KafkaError
from prometheus_client import CollectorRegistry

from stream_app.backoff import FATAL_KAFKA_ERRORS, fatal_kafka_fix
from stream_app.errors import RejectReason
from stream_app.metrics import WorkerMetrics
from stream_app.worker.error_policy import POLICY, Handling, Rule, Stage, policy_table

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(\{(?P<label>[a-z_]+)="(?P<value>[a-z_]+)"\})?$')


def rule_id(rule: Rule) -> str:
    return f"{rule.stage}: {rule.error[:50]}"


def resolve(where: str) -> Any:
    """``module:qualified.name`` to the object it names."""
    module, _, qualname = where.partition(":")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def test_every_stage_has_rules_and_every_reason_exactly_one() -> None:
    assert {rule.stage for rule in POLICY} == set(Stage)
    counted = Counter(reason for rule in POLICY for reason in rule.reasons)
    assert set(counted) == set(RejectReason), set(RejectReason) - set(counted)
    assert [r for r, n in counted.items() if n > 1] == []
    for rule in POLICY:
        assert bool(rule.reasons) == (rule.handling is Handling.DEAD_LETTERED), rule_id(rule)


@pytest.mark.parametrize("rule", POLICY, ids=rule_id)
def test_the_code_named_exists_and_holds_the_lines_quoted(rule: Rule) -> None:
    sources = [inspect.getsource(resolve(where)) for where in rule.where]
    quoted = [text for text in (rule.log and rule.log[1], rule.backoff) if text]
    for text in quoted:
        assert any(text in source for source in sources), f"{text!r} not in {rule.where}"
    if rule.log is not None:
        assert rule.log[0] in {"INFO", "WARNING", "ERROR", "stderr"}, rule.log


def test_every_metric_named_is_exported() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry, process_collectors=False)
    families = {family.name: family for family in registry.collect()}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in families.values()
        for sample in family.samples
    }
    # A family whose labels are not known in advance (topic, partition) has no sample yet.
    names = {name for name, _ in samples} | {
        f"{name}_total" if family.type == "counter" else name for name, family in families.items()
    }
    for rule in POLICY:
        for metric in rule.metrics:
            match = SAMPLE.match(metric)
            assert match is not None, metric
            if match["label"]:
                # A labelled sample is one the worker creates at start: it reads 0, not
                # nothing, before the first failure.
                wanted = (match["name"], ((match["label"], match["value"]),))
                assert wanted in samples, f"{metric} ({rule_id(rule)}) is not exported"
            else:
                assert match["name"] in names, f"{metric} ({rule_id(rule)}) is not exported"


def test_every_alert_named_is_a_rule_with_a_runbook() -> None:
    groups = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    readme = (ROOT / "README.md").read_text()
    for rule in POLICY:
        if rule.alert is not None:
            assert rule.alert in alerts, rule_id(rule)
            assert f"### {rule.alert}\n" in readme, f"{rule.alert} has no runbook paragraph"


def test_fatal_rules_and_only_they_stop_the_worker_with_an_exit_code() -> None:
    for rule in POLICY:
        if rule.handling is Handling.FATAL:
            assert rule.exit_code in (1, 2), rule_id(rule)
            assert rule.log is not None, f"a fatal error must say why: {rule_id(rule)}"
        else:
            assert rule.exit_code is None, rule_id(rule)
        if rule.exit_code == 2:  # configuration: found before anything is consumed
            assert rule.stage is Stage.START and rule.fix, rule_id(rule)


def test_a_kafka_error_no_retry_heals_is_never_retried_but_fatal_with_a_fix() -> None:
    """A Kafka error no retry changes (an ACL removed, a record too large) is not retried:
    the worker stops saying what to fix (:data:`stream_app.backoff.FATAL_KAFKA_ERRORS`),
    and the policy says so; any other permanent error retried must say what to change."""
    fatal_kinds = {kind for kind, _ in FATAL_KAFKA_ERRORS}
    stated = set()
    for rule in POLICY:
        listed = {e for e in rule.exceptions if e in fatal_kinds}
        if rule.handling is Handling.FATAL:
            stated |= listed
            continue
        assert not listed, f"{rule_id(rule)} retries {listed}, which the worker never retries"
        if rule.handling is not Handling.RETRIED:
            continue
        assert rule.log is not None or rule.backoff is not None, rule_id(rule)
        kafka_errors: list[type[KafkaError]] = [
            e for e in rule.exceptions if issubclass(e, KafkaError)
        ]
        permanent = [e for e in kafka_errors if e is not KafkaError and not e.retriable]
        if permanent:
            assert rule.fix, f"{rule_id(rule)} retries {permanent} without saying what to fix"
            assert rule.metrics, rule_id(rule)
    # The worker's fatal list and the policy agree, the cluster ACL aside (start-up only).
    assert fatal_kinds - stated <= {ClusterAuthorizationFailedError}, fatal_kinds - stated
    for kind, fix in FATAL_KAFKA_ERRORS:
        assert fatal_kafka_fix(kind("x")) == fix


def test_the_readme_table_has_a_row_per_rule() -> None:
    table = policy_table()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(POLICY)
    for rule, row in zip(POLICY, rows[1:], strict=True):
        assert row.startswith(f"| {rule.stage} | {rule.error} | {rule.handling} |"), row
