"""The session's Redis Cluster (3 primaries, 3 replicas) for the tests that need one.

The launcher is :class:`training.ops.services.redis_cluster.LocalRedisCluster`, shared with the
bench; ``redis_cluster`` starts it once per session and always stops it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stream_app.errors import ConfigError
from training.ops.services.redis_cluster import LocalRedisCluster


@pytest.fixture(scope="session", name="redis_cluster")
def redis_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A 3-primary, 3-replica Redis Cluster, started once for the session, always stopped."""
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        try:
            cluster.start()
        except ConfigError as exc:
            pytest.skip(str(exc))
        yield cluster
    finally:
        cluster.stop()
