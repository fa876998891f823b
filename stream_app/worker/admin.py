"""The one admin client a worker's Kafka path shares (:class:`SharedAdmin`)."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from stream_app.config import Settings
from stream_app.kafka import config as kafka_config


class SharedAdmin:
    """An admin client started on first use: the loop's tasks (the output topics' watch,
    the labels backlog, the former labels group's commits) ask the brokers through one
    connection, and a worker that never needs one opens none."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: AIOKafkaAdminClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> AIOKafkaAdminClient:
        """The admin client, started on first use."""
        async with self._lock:
            if self._admin is None:
                admin = AIOKafkaAdminClient(**kafka_config.client_kwargs(self.settings))
                await admin.start()
                self._admin = admin
            return self._admin

    async def close(self) -> None:
        """Close the client, if it was started."""
        if self._admin is not None:
            with contextlib.suppress(KafkaError):
                await self._admin.close()
