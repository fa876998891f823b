"""Output topics that disappear while the worker runs (:class:`OutputTopics`).

A broker may acknowledge writes to a topic deleted meanwhile and store nothing (the bundled
broker does); Apache Kafka holds them for the producer's request timeout and then refuses
them, and a topic re-created by auto-creation takes them with other partitions. So the
loop never counts a batch as published while a topic it writes is missing: it is logged,
retried, sent again once the topic is back, and its offsets stay uncommitted meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from aiokafka.errors import UnknownTopicOrPartitionError

from stream_app.config import Settings
from stream_app.kafka import preflight as kafka_preflight
from stream_app.kafka.publisher import Output
from stream_app.metrics import WorkerMetrics
from stream_app.worker.admin import SharedAdmin

log = logging.getLogger(__name__)

# What a batch sent while an output topic was known to be missing records as its
# ``sent_after_loss`` (see OutputTopics.sent_mark).
_SENT_WHILE_MISSING: Final = -1


class OutputTopics:
    """Whether the output topics exist: how many times one was found missing
    (:attr:`losses`), and whether one is missing now (:attr:`missing`).

    A batch records :meth:`sent_mark` when its outputs are sent; a loss seen since (the
    mark differs from :attr:`losses`) means they must be sent again.
    """

    def __init__(self, settings: Settings, metrics: WorkerMetrics, admin: SharedAdmin) -> None:
        self.settings = settings
        self.metrics = metrics
        self.admin = admin
        self.losses = 0
        self.missing = False

    def sent_mark(self) -> int:
        """What a batch sent now records in ``sent_after_loss``."""
        return _SENT_WHILE_MISSING if self.missing else self.losses

    async def watch(self) -> None:
        """Say at once, loudly, when an output topic disappears (and when it is back).

        Apache Kafka holds writes to a missing topic for the producer's request timeout
        before it fails them, silently meanwhile; this check, every second, logs the
        missing topics at ERROR with the settings that name them and drops
        ``fraudstream_ready`` to 0. Batches sent before it are sent again
        (:meth:`~stream_app.worker.loop.ScoringLoop._acknowledged`), and none is committed
        while a topic it writes is missing (:meth:`check_exist`).
        """
        s = self.settings
        topics = [
            s.topic_scores,
            s.topic_alerts,
            s.topic_shadow_scores,
            s.topic_dead_letters,
            s.topic_label_dead_letters,
            s.topic_repartition,
        ]
        missing = await kafka_preflight.missing_topics(await self.admin.client(), topics)
        if missing and not self.missing:
            self.losses += 1
            self.metrics.ready.set(0)
            log.error(
                "output topics %s do not exist: nothing is committed until they are back "
                "(create them, or fix the settings)",
                ", ".join(f"{t} ({self.topic_setting(t)})" for t in missing),
            )
        elif not missing and self.missing:
            log.info("the output topics exist again")
            self.metrics.ready.set(1)  # a failing loop sets it to 0 again at its next retry
        self.missing = bool(missing)

    async def check_exist(self, outputs: Sequence[Output]) -> None:
        """Refuse to count a batch as published if a topic it wrote to is gone.

        A broker may acknowledge writes to a topic deleted meanwhile and store nothing (the
        bundled broker does); Apache Kafka refuses them, but a topic deleted and re-created
        by auto-creation takes them with other partitions. Asking the brokers (without
        creating anything) after the acknowledgements and before the commit costs one
        metadata round trip per batch, and a batch whose topic is missing is an error:
        logged, retried with backoff (``fraudstream_ready`` 0), re-sent once it is back,
        and its offsets are not committed meanwhile. Batches acknowledged before the loss
        was seen, or while it lasted, are sent again too (:meth:`sent_mark`).

        Raises:
            UnknownTopicOrPartitionError: an output topic does not exist.
        """
        topics = sorted({output.topic for output in outputs})
        if not topics:
            return
        missing = await kafka_preflight.missing_topics(await self.admin.client(), topics)
        if missing:
            if not self.missing:  # cleared by watch once they are back
                self.losses += 1
                self.missing = True
            named = ", ".join(f"{t} ({self.topic_setting(t)})" for t in missing)
            log.error(
                "output topics %s do not exist: the batch's %d records were not stored; its "
                "offsets stay uncommitted and it is sent again once the topics are back",
                named,
                len(outputs),
            )
            raise UnknownTopicOrPartitionError(f"output topics {named} do not exist")

    def refuse_while_missing(self, outputs: Sequence[Output]) -> None:
        """Fail fast, without a round trip, while :meth:`watch` or an earlier
        batch found an output topic missing.

        Raises:
            UnknownTopicOrPartitionError: an output topic was missing at the last check.
        """
        if self.missing:
            raise UnknownTopicOrPartitionError(
                f"an output topic is missing (see the errors above): the batch's "
                f"{len(outputs)} records are not sent until it is back"
            )

    def topic_setting(self, topic: str) -> str:
        """The setting that names one of the worker's topics."""
        for need in kafka_preflight.topic_needs(self.settings):
            if need.topic == topic:
                return need.setting
        return "unknown setting"
