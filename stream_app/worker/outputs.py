"""The records a batch publishes, and the partition each goes to (:class:`OutputRecords`).

Scores, alerts and shadow scores are keyed by customer and go to the customer's partition;
a transaction read on a partition that is not its customer's is forwarded, as it came, to
the repartition topic; a dead letter keeps its source partition's order. No I/O here: the
loop sends what these build.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from stream_app.config import Settings
from stream_app.errors import RejectedEvent, RejectReason
from stream_app.kafka.publisher import Output, key_partition
from stream_app.records import dead_letter_headers
from stream_app.scoring.pipeline import Accepted, Rejected, ScoredBatch

log = logging.getLogger(__name__)


class OutputRecords:
    """Builds a batch's output records for the topics ``settings`` names, partitioned
    over ``partitions`` (each topic's partition count)."""

    def __init__(self, settings: Settings, partitions: Mapping[str, int]) -> None:
        self.settings = settings
        self.partitions = partitions
        self.source_partitions = partitions[settings.topic_transactions]

    def route(self, accepted: Sequence[Accepted]) -> tuple[list[Accepted], list[Output]]:
        """Split valid transactions into those scored here and those forwarded to their
        customer's partition of the repartition topic."""
        s = self.settings
        local: list[Accepted] = []
        forwards: list[Output] = []
        for valid in accepted:
            message = valid.message
            key = valid.event.customer_id.encode()
            home = key_partition(key, self.source_partitions)
            # Events read from the repartition topic are processed wherever they are, so a
            # partition-count change can never bounce an event between the two topics.
            if message.topic == s.topic_repartition or message.partition == home:
                local.append(valid)
            else:
                forwards.append(
                    Output(
                        s.topic_repartition,
                        home,
                        key,
                        message.value or b"",
                        timestamp_ms=message.timestamp_ms,
                    )
                )
        return local, forwards

    def scored(self, scored: ScoredBatch) -> list[Output]:
        """A scored batch's records: scores, alerts and shadow scores."""
        s = self.settings
        scores_n = self.partitions[s.topic_scores]
        alerts_n = self.partitions[s.topic_alerts]
        shadow_n = self.partitions[s.topic_shadow_scores]
        keys = scored.keys
        outputs = [
            Output(s.topic_scores, key_partition(key, scores_n), key, payload)
            for key, payload in zip(keys, scored.payloads, strict=True)
        ]
        for i in scored.alerts:
            key = keys[i]
            outputs.append(
                Output(s.topic_alerts, key_partition(key, alerts_n), key, scored.payloads[i])
            )
        for key, payload in zip(scored.shadow_keys, scored.shadow_payloads, strict=True):
            shadow = key_partition(key, shadow_n)
            outputs.append(Output(s.topic_shadow_scores, shadow, key, payload))
        return outputs

    def refused(
        self, local: Sequence[Accepted], scored: ScoredBatch, version: str
    ) -> list[Rejected]:
        """The events of ``local`` the batch could not score, to be dead-lettered: those
        the champion (``version``) gave no probability for, and conflicting duplicates
        (see ``ScoredBatch``)."""
        refusals = [
            (
                i,
                RejectReason.UNSCORABLE,
                f"model {version} gave no probability for this transaction",
            )
            for i in scored.unscorable
        ] + [
            (
                i,
                RejectReason.CONFLICTING_DUPLICATE,
                f"transaction id {local[i].event.transaction_id!r} was already used "
                "for another transaction (amount, time, terminal or customer differ)",
            )
            for i in scored.conflicting
        ]
        refused: list[Rejected] = []
        for i, reason, detail in refusals:
            rejected = Rejected(local[i].message, RejectedEvent(reason, detail))
            refused.append(rejected)
            log.warning(
                "transaction at %s[%d] offset %d refused (%s): dead-lettered",
                rejected.message.topic,
                rejected.message.partition,
                rejected.message.offset,
                reason,
            )
        return refused

    def dead_letter(self, rejected: Rejected, topic: str | None = None) -> Output:
        """The dead letter of a message: its original bytes, and why, in headers; on the
        transactions' dead-letter topic unless ``topic`` says another."""
        m = rejected.message
        topic = topic or self.settings.topic_dead_letters
        return Output(
            topic,
            # Source order kept per partition.
            m.partition % self.partitions[topic],
            m.key,
            m.value or b"",
            dead_letter_headers(rejected.error, m.topic, m.partition, m.offset),
        )
