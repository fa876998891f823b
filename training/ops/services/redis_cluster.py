"""A local Redis Cluster on loopback ports: for the tests and the bench, never a service.

:class:`LocalRedisCluster` starts ``2 x primaries`` ``redis-server --cluster-enabled yes``
processes (3 primaries and 3 replicas by default), each with its own directory,
``--appendonly yes --appendfsync always`` (what a deployment with persistence runs) and a
short ``cluster-node-timeout``, so a killed primary is replaced by its replica within
seconds; then ``redis-cli --cluster create ... --cluster-replicas 1`` joins them. A node may
be SIGKILLed and started again on the same port and directory: it rejoins as a replica of the
node that took its slots. Debian's ``redis-server`` and ``redis-cli`` (``redis-tools``) are
all it needs.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from stream_app.errors import ConfigError
from training.ops.services.net import LOOPBACK, wait_for_port


def _binary(name: str) -> str:
    """Path of ``redis-server`` or ``redis-cli``.

    Raises:
        ConfigError: it is not installed.
    """
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"{name} is not installed (Debian: apt-get install redis)")
    return path


# The cluster bus listens on the node's port + 10000: both must be free.
_BUS_OFFSET = 10_000
NODE_TIMEOUT_MS = 2_000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """``count`` ports whose cluster-bus ports (+10000) are free too (below the ephemeral
    range, so a client socket is unlikely to take one meanwhile)."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < count:
        port = rng.randrange(20_000, 30_000)
        if port not in ports and _bindable(port) and _bindable(port + _BUS_OFFSET):
            ports.append(port)
    return ports


@dataclass
class ClusterNode:
    """One ``redis-server`` of the cluster."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A plain (not cluster-aware) client of this node."""
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)


@dataclass
class LocalRedisCluster:
    """A Redis Cluster of ``primaries`` primaries with one replica each, on loopback ports;
    ``with LocalRedisCluster(directory) as cluster:`` starts it and always stops it."""

    directory: Path
    primaries: int = 3
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``redis://`` URL of one node: a cluster client discovers the others from it."""
        return f"redis://{LOOPBACK}:{self.nodes[0].port}/0"

    def _launch(self, node: ClusterNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        command = [
            _binary("redis-server"), "--bind", LOOPBACK, "--port", str(node.port),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--dir", str(node.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]  # fmt: skip
        with (node.directory / "redis.log").open("ab") as log:
            node.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if not wait_for_port(LOOPBACK, node.port, 10.0):
            raise AssertionError(f"redis-server did not start on port {node.port}")

    def start(self) -> LocalRedisCluster:
        """Start the nodes, create the cluster, wait until every slot is served and every
        primary has its replica in sync."""
        cli = _binary("redis-cli")
        ports = cluster_ports(2 * self.primaries)
        self.nodes = [ClusterNode(p, self.directory / str(p)) for p in ports]
        for node in self.nodes:
            self._launch(node)
        addresses = [f"{LOOPBACK}:{n.port}" for n in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy(timeout_s=60)
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        """Until every running node says ``cluster_state:ok``, there are ``primaries``
        primaries, and each has a replica whose link is up."""
        deadline = time.monotonic() + timeout_s
        problem = "not checked"
        while time.monotonic() < deadline:
            problem = self._health_problem()
            if not problem:
                return
            time.sleep(0.2)
        raise AssertionError(f"the Redis Cluster is not healthy after {timeout_s} s: {problem}")

    def _health_problem(self) -> str:
        for node in self.running():
            with node.client() as client:
                try:
                    info = client.execute_command("CLUSTER", "INFO")
                except redis.RedisError as exc:
                    return f"{node.port}: {exc}"
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return f"{node.port}: cluster_state not ok: {text[:40]!r}"
        primaries = self.primary_ports()
        if len(primaries) != self.primaries:
            return f"{len(primaries)} primaries"
        for port in primaries:
            with ClusterNode(port, self.directory).client() as client:
                role = client.execute_command("ROLE")
                if not role[2]:
                    return f"primary {port} has no replica"
                replication = client.info("replication")
                states = [v for k, v in replication.items() if k.startswith("slave")]
                if not states or any(s.get("state") != "online" for s in states):
                    return f"primary {port}'s replica is not online"
        return ""

    def running(self) -> list[ClusterNode]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def primary_ports(self) -> list[int]:
        """Ports of the running primaries (as the running nodes see the cluster)."""
        ports = set()
        for node in self.running():
            with node.client() as client:
                role = client.execute_command("ROLE")
            if role[0] in (b"master", "master"):
                ports.add(node.port)
        return sorted(ports)

    def primary_of(self, key: str) -> ClusterNode:
        """The node that serves ``key``'s slot now."""
        with RedisCluster(host=LOOPBACK, port=self.running()[0].port) as client:
            port = int(client.get_node_from_key(key).port)
        return next(n for n in self.nodes if n.port == port)

    def wait_for_failover(self, killed: ClusterNode, timeout_s: float) -> None:
        """Until another node (``killed``'s replica) serves its slots: ``primaries`` running
        primaries again, and every running node says ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.primary_ports()) == self.primaries and all(
                "cluster_state:ok" in self._cluster_info(n) for n in self.running()
            ):
                return
            time.sleep(0.2)
        raise AssertionError(f"no replica took over from {killed.port} in {timeout_s} s")

    def _cluster_info(self, node: ClusterNode) -> str:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
        return info.decode() if isinstance(info, bytes) else str(info)

    def keys_per_primary(self, prefix: str) -> dict[int, int]:
        """How many keys under ``prefix`` each primary holds."""
        counts = {}
        for port in self.primary_ports():
            with ClusterNode(port, self.directory).client() as client:
                counts[port] = sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000))
        return counts

    def node(self, port: int) -> ClusterNode:
        """The node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node: a crash."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(timeout=10)

    def restart(self, node: ClusterNode) -> None:
        """Start a stopped node again on its port and directory (it rejoins the cluster)."""
        self._launch(node)

    def flush(self, prefix: str) -> None:
        """Delete every key under ``prefix`` on every primary."""
        for port in self.primary_ports():
            with ClusterNode(port, self.directory).client() as client:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for key in keys:
                    client.delete(key)

    def state(self, prefix: str) -> dict[str, object]:
        """Every key under ``prefix`` on the primaries, the prefix removed, with its value."""
        state: dict[str, object] = {}
        for port in self.primary_ports():
            with ClusterNode(port, self.directory).client() as client:
                for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                    name = key.decode()[len(prefix) :]
                    kind = client.type(key)
                    state[name] = client.hgetall(key) if kind == b"hash" else client.get(key)
        return state

    def __enter__(self) -> LocalRedisCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate every node (SIGKILL those that do not stop within 10 s)."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)
