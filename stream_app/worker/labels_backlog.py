"""Labels before a backlog: after an assignment, scoring waits for the labels already
published (:class:`LabelsBacklog`).

A transaction's terminal windows count the frauds labelled up to days of event time before
it. Live, a label is applied within a batch of its arrival, long before a transaction reads
it; but after a restart the loop would score days of backlog in seconds, before that
backlog's labels are applied, and features would depend on timing. So after every
assignment the loop reads only labels until the group has applied every label published
before the assignment, on every labels partition: those it owns it applies and commits
itself; those another member owns, that member applies meanwhile (every member goes
through the same phase after the rebalance that assigned them), and its progress is read
from the group's committed offsets, which only ever name applied labels. Then it scores the
transactions. The wait is bounded (``_LABELS_WAIT_S``): a member that never catches up
delays scoring that long, with a warning, once per assignment.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from stream_app.config import Settings
from stream_app.metrics import WorkerMetrics
from stream_app.worker.admin import SharedAdmin
from stream_app.worker.offsets import Offsets

log = logging.getLogger(__name__)

# After an assignment, scoring waits at most this long for the group to apply the labels
# already published (see LabelsBacklog._caught_up), reading its commits this often.
_LABELS_WAIT_S: Final = 30.0
LABELS_POLL_S: Final = 0.2


@dataclass
class _Published:
    """The labels published before an assignment, to be applied before scoring."""

    ends: dict[TopicPartition, int]  # end offset of every labels partition, then
    started: float  # time.monotonic() at the assignment
    checked_at: float = -math.inf  # last read of the group's commits


class LabelsBacklog:
    """Whether the loop must read only labels for now (:meth:`waiting`).

    ``pending`` is set by each assignment (the rebalance listener cannot wait in its
    callback: that would hold up the group's join); the loop then calls :meth:`measure`.
    """

    def __init__(
        self,
        settings: Settings,
        partitions: Mapping[str, int],
        metrics: WorkerMetrics,
        admin: SharedAdmin,
        offsets: Offsets,
    ) -> None:
        self.settings = settings
        self.partitions = partitions
        self.metrics = metrics
        self.admin = admin
        self.offsets = offsets
        self.pending = False  # set on assignment
        self._backlog: _Published | None = None

    async def measure(self) -> None:
        """Note the labels published so far: scoring waits until they are applied."""
        self._backlog = await self._published()

    async def waiting(self) -> bool:
        """Whether scoring still waits for the labels backlog (then poll labels only)."""
        return self._backlog is not None and not await self._caught_up(self._backlog)

    async def _published(self) -> _Published | None:
        """The end offsets of every labels partition: what must be applied before scoring
        (see the module's docstring). None when the brokers cannot tell (then scoring
        goes on without waiting, with a warning)."""
        topic = self.settings.topic_labels
        partitions = [TopicPartition(topic, p) for p in range(self.partitions[topic])]
        try:
            ends = await self.offsets.end_offsets(partitions, fetched=False)
        except KafkaError as exc:
            self.metrics.kafka_errors.labels("admin").inc()
            log.warning("cannot tell which labels were published (%s); scoring anyway", exc)
            return None
        return _Published(ends, time.monotonic())

    async def _caught_up(self, backlog: _Published) -> bool:
        """Whether the group has applied every label of ``backlog`` (then it is dropped).

        A transaction's terminal windows count the frauds labelled up to eight days of
        event time before it. After a restart both streams start from a backlog; scored at
        once, days of transactions would be scored before their labels are applied, and the
        features (and the histories they are stored in) would depend on timing. So after an
        assignment the loop reads only labels until the group's committed offsets (which
        name applied labels only: this loop commits a label once it is in Redis) reach the
        end offsets of every labels partition as of the assignment, its own partitions and
        the other members'. Its own it applies meanwhile (``labels_only`` in
        :meth:`~stream_app.worker.loop.ScoringLoop.run`);
        the other members, assigned by the same rebalance, apply theirs. At most
        ``_LABELS_WAIT_S``: a labels path that does not catch up delays scoring that long,
        once per assignment, with a warning, and does not stop it.
        """
        now = time.monotonic()
        if now - backlog.checked_at < LABELS_POLL_S:
            return False
        backlog.checked_at = now
        try:
            admin = await self.admin.client()
            committed = await admin.list_consumer_group_offsets(
                self.settings.scoring_group_id, partitions=list(backlog.ends)
            )
        except KafkaError as exc:
            self.metrics.kafka_errors.labels("admin").inc()
            log.warning("cannot tell how far the labels are applied (%s); scoring anyway", exc)
            self._backlog = None
            return True
        behind = 0
        for tp, end in backlog.ends.items():
            done = committed[tp].offset if tp in committed else -1
            # Our own partitions: also what Offsets.catch_up counted (commit markers).
            behind += max(end - max(done, self.offsets.processed.get(tp, -1), 0), 0)
        waited = now - backlog.started
        if behind and waited <= _LABELS_WAIT_S:
            return False
        self._backlog = None
        if behind:
            log.warning(
                "the group %s is still %d labels behind after %.0f s; scoring without them "
                "(terminal risk may miss recent frauds)",
                self.settings.scoring_group_id,
                behind,
                _LABELS_WAIT_S,
            )
        elif waited > 1.0:
            log.info("applied the labels backlog in %.1f s before scoring", waited)
        return True
