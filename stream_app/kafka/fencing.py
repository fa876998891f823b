"""Zombie fencing for exactly-once: input offsets committed with the group generation.

Under exactly-once each micro-batch is one Kafka transaction holding its outputs and its
input offsets (``TxnOffsetCommit``). A worker frozen for longer than the consumer session
timeout (a long pause, a stalled VM, a network cut) is removed from the group and its
partitions go to another worker, which scores their uncommitted events again. When the
frozen worker wakes, its producer is still valid (its transactional id is its own, which
nobody fences), so the batch it had in flight would commit too: the same events twice
downstream. Kafka's answer (KIP-447) is to send the consumer's group generation and member
id with the offsets: the group coordinator then refuses a stale member's offsets, and the
transaction can only abort.

aiokafka sends ``TxnOffsetCommit`` version 0, which has no generation. This module gives a
worker's transactional producer version 3 (flexible; generation, member id), and turns the
coordinator's refusal into :class:`GroupFencedError`, on which the scoring loop aborts,
drops what it had in flight and re-reads from the committed offsets. It needs a broker of
Kafka 2.5 or later (version 3), as exactly-once does here anyway.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import CoordinationType
from aiokafka.errors import GroupAuthorizationFailedError
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)

from stream_app.errors import FraudStreamError

log = logging.getLogger(__name__)

# Group coordinator answers that mean "you are not the member that owns these partitions".
ILLEGAL_GENERATION: Final = 22
UNKNOWN_MEMBER_ID: Final = 25
REBALANCE_IN_PROGRESS: Final = 27
FENCED_INSTANCE_ID: Final = 82
_FENCED: Final = {ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID}
_NO_LEADER_EPOCH: Final = -1


class GroupFencedError(FraudStreamError):
    """The group no longer gives this worker the partitions of its transaction: abort it."""


class _TxnOffsetCommitResponseV3(Response):  # type: ignore[misc]
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32), ("error_code", Int16), ("tags", TaggedFields)
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _TxnOffsetCommitRequestV3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = _TxnOffsetCommitResponseV3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("committed_metadata", CompactString("utf-8")),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _TxnOffsetCommitRequest(Request[_TxnOffsetCommitRequestV3]):  # type: ignore[misc]
    API_KEY = 28

    def __init__(self, fields: tuple[Any, ...]) -> None:
        self._fields = fields

    def build(self, request_struct_class: type[_TxnOffsetCommitRequestV3]) -> Any:
        return request_struct_class(*self._fields)


GroupMetadata = Callable[[], tuple[int, str]]  # (generation id, member id) right now


class _GenerationTxnOffsetCommitHandler(TxnOffsetCommitHandler):  # type: ignore[misc]
    def __init__(self, sender: Any, offsets: Any, group_id: str, metadata: GroupMetadata) -> None:
        super().__init__(sender, offsets, group_id)
        self._metadata = metadata
        self._sent_generation = -1

    def create_request(self) -> _TxnOffsetCommitRequest:
        txn = self._sender._txn_manager
        generation, member_id = self._metadata()
        self._sent_generation = generation
        by_topic: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
        for tp, offset in sorted(self._offsets.items()):
            by_topic[tp.topic].append(
                (tp.partition, offset.offset, _NO_LEADER_EPOCH, offset.metadata, {})
            )
        topics: list[tuple[Any, ...]] = [(t, parts, {}) for t, parts in by_topic.items()]
        return _TxnOffsetCommitRequest(
            (
                txn.transactional_id,
                self._group_id,
                txn.producer_id,
                txn.producer_epoch,
                generation,
                member_id,
                None,
                topics,
                {},
            )
        )

    def handle_response(self, resp: Any) -> Any:
        for name, partitions, _ in resp.topics:
            for partition, error_code, _ in partitions:
                if error_code in _FENCED:
                    txn = self._sender._txn_manager
                    txn.error_transaction(
                        GroupFencedError(
                            f"the consumer group refused this worker's offsets for "
                            f"{name}[{partition}] (error {error_code}, generation "
                            f"{self._sent_generation}): its partitions belong to another "
                            "member now"
                        )
                    )
                    # The send_offsets call raises it and the transaction aborts: that is
                    # its handling; the same error on the transaction's waiter is no news.
                    txn._transaction_waiter.exception()
                    return None
        # Everything else as aiokafka handles version 0, whose shape this mimics.
        errors = [(name, [(p, e) for p, e, _ in parts]) for name, parts, _ in resp.topics]
        return super().handle_response(SimpleNamespace(errors=errors))


def group_metadata(consumer: AIOKafkaConsumer) -> GroupMetadata:
    """``consumer``'s group generation and member id, read each time they are needed."""

    def metadata() -> tuple[int, str]:
        coordinator = consumer._coordinator
        return int(coordinator.generation), str(coordinator.member_id)

    return metadata


def fence_by_generation(producer: AIOKafkaProducer, metadata: GroupMetadata) -> None:
    """Make ``producer`` commit transactional offsets with a group generation and member id
    (:func:`group_metadata` of the consumer whose offsets they are).

    Call after the producer has started. Its offsets then commit only while that consumer is
    the member the group gave the partitions to (KIP-447); otherwise the transaction fails
    with :class:`GroupFencedError` and can only abort.
    """
    sender = producer._sender

    async def txn_offset_commit(offsets: Any, group_id: str) -> None:
        # aiokafka's own _do_txn_offset_commit, with the generation-aware handler.
        if not offsets:
            return
        try:
            node_id = await sender._find_coordinator(CoordinationType.GROUP, group_id)
        except GroupAuthorizationFailedError as exc:
            sender._txn_manager.error_transaction(exc)
            return
        handler = _GenerationTxnOffsetCommitHandler(sender, offsets, group_id, metadata)
        await handler.do(node_id)

    sender._do_txn_offset_commit = txn_offset_commit
