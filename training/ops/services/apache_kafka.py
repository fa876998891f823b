"""Apache Kafka (KRaft) from its Maven Central jars: one node or a small cluster on loopback.

What ``docker-compose.yml`` deploys is what the tests, the bench and ``fraudstream demo
--broker kafka`` run: the official broker, in KRaft combined mode (each node a broker and a
controller), with the same transaction-log and topic settings (:data:`COMPOSE_SETTINGS`,
kept equal to the compose file by a test). No Docker: ``pom.xml`` beside this module names
the broker's artifacts, :func:`install` copies them and their dependencies into the user
cache with Maven once, and every node is a ``java -cp 'libs/*' kafka.Kafka`` process with a
bounded heap and a data directory of its own.

Listeners (loopback only)::

    PLAINTEXT  always; super user when ACLs are on (tests' admin client)
    SASL       SASL_SSL with SCRAM-SHA-512, users created at format time (``scram_users``)
    MTLS       SSL with a required client certificate; principal User:<certificate CN>

    with ApacheKafka(tls=files, scram_users={"worker": "pw"}, acls=True) as kafka:
        kafka.bootstrap_servers            # PLAINTEXT
        kafka.listener_servers("SASL")     # SASL_SSL
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

from stream_app.errors import ConfigError
from training.ops.services.net import LOOPBACK, free_port, wait_for_port

POM: Final = Path(__file__).with_name("pom.xml")
_MAVEN_NS: Final = "{http://maven.apache.org/POM/4.0.0}"
DEFAULT_HEAP: Final = "512m"
# Broker settings the tests share with the kafka service of docker-compose.yml (single node).
# Topics are created by the worker (or the test), never by a typo in a client.
COMPOSE_SETTINGS: Final[Mapping[str, str]] = {
    "process.roles": "broker,controller",
    "controller.listener.names": "CONTROLLER",
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "false",
    "num.partitions": "6",
}
# A replicated cluster: every partition on three nodes, acknowledged by two.
CLUSTER_SETTINGS: Final[Mapping[str, str]] = {
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    # Fail over quickly in tests: a dead node is fenced after 3 s without heartbeats.
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
    "unclean.leader.election.enable": "false",
}
_STARTED_LINE: Final = b"Kafka Server started"
_LOG4J: Final = """\
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.clients.name = org.apache.kafka
logger.clients.level = WARN
"""


def kafka_version() -> str:
    """The Apache Kafka version ``pom.xml`` pins."""
    root = ET.parse(POM).getroot()
    node = root.find(f"{_MAVEN_NS}properties/{_MAVEN_NS}kafka.version")
    if node is None or not node.text:
        raise ConfigError(f"{POM} has no <kafka.version> property")
    return node.text.strip()


def cache_dir() -> Path:
    """Where the broker's jars are kept: ``$FRAUDSTREAM_CACHE_DIR`` or ~/.cache/fraudstream."""
    configured = os.environ.get("FRAUDSTREAM_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fraudstream"


def libs_dir() -> Path:
    """The directory of this version's jars (present once :func:`install` has run)."""
    return cache_dir() / f"kafka-{kafka_version()}" / "libs"


def installed() -> bool:
    """Whether the broker's jars are in the cache."""
    return (libs_dir() / f"kafka_2.13-{kafka_version()}.jar").is_file()


def install(*, quiet: bool = True) -> Path:
    """Copy Apache Kafka and its runtime dependencies from Maven Central into the cache.

    A second call finds them there and downloads nothing.

    Returns:
        The directory of the jars.

    Raises:
        ConfigError: Maven is missing or the download failed.
    """
    target = libs_dir()
    if installed():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ConfigError(
            "Apache Kafka is installed from Maven Central with Maven: install it "
            "(apt-get install maven) or run `bash tests/setup.sh`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=target.parent))
    command = [
        mvn,
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=quiet, text=True, check=False)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        detail = (result.stdout or "")[-2000:] if quiet else ""
        raise ConfigError(f"Maven could not fetch Apache Kafka {kafka_version()}:\n{detail}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def java_binary() -> str:
    """The ``java`` executable (JDK 17 or later)."""
    java = shutil.which("java")
    if java is None:
        raise ConfigError("Apache Kafka needs a Java runtime (17+): apt-get install openjdk-17-jre")
    return java


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the broker's TLS listeners.

    Args:
        ca: The CA that signed the broker's certificate and the clients' certificates.
        cert: The broker's certificate (its subject alternative names include 127.0.0.1).
        key: The broker's private key, unencrypted PKCS#8.
    """

    ca: Path
    cert: Path
    key: Path


@dataclass
class _Node:
    node_id: int
    data_dir: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"


@dataclass
class ApacheKafka:
    """Apache Kafka on loopback: ``nodes`` combined broker/controller processes.

    Args:
        nodes: 1 (the compose settings) or 3 (replication 3, ``min.insync.replicas`` 2).
        tls: Certificates for the SASL and MTLS listeners; without, only PLAINTEXT.
        scram_users: SCRAM-SHA-512 users (name: password) created at format time.
        acls: Turn on the KRaft ``StandardAuthorizer``; PLAINTEXT clients are super users.
        heap: The JVM heap of each node.
        root: Where node data directories go; default a new temporary directory, removed
            by :meth:`stop`.
        extra: More broker properties, applied last.
    """

    nodes: int = 1
    tls: TlsFiles | None = None
    scram_users: Mapping[str, str] = field(default_factory=dict)
    acls: bool = False
    heap: str = DEFAULT_HEAP
    root: Path | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    _nodes: list[_Node] = field(default_factory=list, init=False)
    _own_root: bool = field(default=False, init=False)
    cluster_id: str = field(default_factory=lambda: _cluster_id(), init=False)

    # -- addresses -------------------------------------------------------------------------

    def listener_servers(self, listener: str = "PLAINTEXT") -> str:
        """Bootstrap servers of one listener (``PLAINTEXT``, ``SASL`` or ``MTLS``)."""
        return ",".join(f"{LOOPBACK}:{node.ports[listener]}" for node in self._nodes)

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` list of the PLAINTEXT listener of every node."""
        return self.listener_servers("PLAINTEXT")

    def node_ids(self) -> list[int]:
        """The nodes' ids (1..n)."""
        return [node.node_id for node in self._nodes]

    def log_path(self, node_id: int) -> Path:
        """A node's server log."""
        return self._node(node_id).log_path

    # -- life cycle ------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> str:
        """Format every node's storage, start them, wait until each says it started.

        Returns:
            The PLAINTEXT bootstrap servers.

        Raises:
            ConfigError: Java or the jars are missing, or a node did not start in time.
        """
        if self._nodes:
            return self.bootstrap_servers
        if not installed():
            install()
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="fraudstream-kafka-"))
            self._own_root = True
        listeners = ["PLAINTEXT", "CONTROLLER", *(["SASL", "MTLS"] if self.tls else [])]
        for node_id in range(1, self.nodes + 1):
            data_dir = self.root / f"node-{node_id}"
            data_dir.mkdir(parents=True, exist_ok=True)
            self._nodes.append(_Node(node_id, data_dir, {name: free_port() for name in listeners}))
        for node in self._nodes:
            self._write_config(node)
            self._format(node)
        for node in self._nodes:
            self._launch(node)
        deadline = time.monotonic() + timeout_s
        for node in self._nodes:
            self._wait_started(node, deadline)
        return self.bootstrap_servers

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop every node (SIGTERM, SIGKILL after ``timeout_s``) and remove its data."""
        for node in self._nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)  # a paused node ignores SIGTERM
                node.process.terminate()
        for node in self._nodes:
            self._reap(node, timeout_s)
        self._nodes.clear()
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def pause(self) -> None:
        """SIGSTOP every node: the cluster freezes, its sockets open and silent."""
        for node in self._nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT every node after :meth:`pause`."""
        for node in self._nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: a crash, no controlled shutdown."""
        node = self._node(node_id)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
        self._reap(node, 10.0)

    def restart(self, node_id: int, timeout_s: float = 60.0) -> None:
        """Start a stopped or killed node again on its data directory and ports."""
        node = self._node(node_id)
        if node.process is not None and node.process.poll() is None:
            return
        with node.log_path.open("ab") as log:
            log.write(b"\n--- restart ---\n")
        offset = node.log_path.stat().st_size
        self._launch(node)
        self._wait_started(node, time.monotonic() + timeout_s, offset)

    def running(self, node_id: int) -> bool:
        """Whether a node's process is alive."""
        process = self._node(node_id).process
        return process is not None and process.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _node(self, node_id: int) -> _Node:
        for node in self._nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def properties(self, node: _Node) -> dict[str, str]:
        """The ``server.properties`` of a node."""
        voters = ",".join(f"{n.node_id}@{LOOPBACK}:{n.ports['CONTROLLER']}" for n in self._nodes)
        names = list(node.ports)
        protocol = {
            "PLAINTEXT": "PLAINTEXT",
            "CONTROLLER": "PLAINTEXT",
            "SASL": "SASL_SSL",
            "MTLS": "SSL",
        }
        props: dict[str, str] = dict(COMPOSE_SETTINGS)
        if self.nodes > 1:
            props.update(CLUSTER_SETTINGS)
        props.update(
            {
                "node.id": str(node.node_id),
                "controller.quorum.voters": voters,
                "listeners": ",".join(f"{n}://{LOOPBACK}:{node.ports[n]}" for n in names),
                "advertised.listeners": ",".join(
                    f"{n}://{LOOPBACK}:{node.ports[n]}" for n in names if n != "CONTROLLER"
                ),
                "listener.security.protocol.map": ",".join(f"{n}:{protocol[n]}" for n in names),
                "inter.broker.listener.name": "PLAINTEXT",
                "log.dirs": str(node.data_dir / "log"),
                "num.network.threads": "2",
                "num.io.threads": "4",
                "log.flush.interval.messages": str(sys.maxsize),
                "transaction.remove.expired.transaction.cleanup.interval.ms": "60000",
                "share.coordinator.state.topic.replication.factor": props[
                    "offsets.topic.replication.factor"
                ],
                "share.coordinator.state.topic.min.isr": "1" if self.nodes == 1 else "2",
            }
        )
        if self.tls is not None:
            props.update(
                {
                    "ssl.keystore.type": "PEM",
                    "ssl.keystore.location": str(self._keystore_pem(node)),
                    "ssl.truststore.type": "PEM",
                    "ssl.truststore.location": str(self.tls.ca),
                    "ssl.endpoint.identification.algorithm": "",
                    "listener.name.mtls.ssl.client.auth": "required",
                    # A client certificate's principal is its CN: User:worker, not the DN.
                    "ssl.principal.mapping.rules": "RULE:^CN=([^,]+).*$/$1/,DEFAULT",
                    "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                    "listener.name.sasl.sasl.enabled.mechanisms": "SCRAM-SHA-512",
                    "listener.name.sasl.scram-sha-512.sasl.jaas.config": (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                    ),
                }
            )
        if self.acls:
            props.update(
                {
                    "authorizer.class.name": (
                        "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
                    ),
                    # PLAINTEXT (the tests' admin, inter-broker and controller traffic).
                    "super.users": "User:ANONYMOUS",
                    "allow.everyone.if.no.acl.found": "false",
                }
            )
        props.update(self.extra)
        return props

    def _keystore_pem(self, node: _Node) -> Path:
        # Kafka's PEM key store is one file: the private key, then the certificate chain.
        assert self.tls is not None
        path = node.data_dir / "broker-keystore.pem"
        path.write_bytes(self.tls.key.read_bytes() + self.tls.cert.read_bytes())
        return path

    def _write_config(self, node: _Node) -> None:
        lines = [f"{k}={v}" for k, v in self.properties(node).items()]
        (node.data_dir / "server.properties").write_text("\n".join(lines) + "\n")
        (node.data_dir / "log4j2.properties").write_text(_LOG4J)

    def _java(self, node: _Node, main: str, *args: str) -> list[str]:
        return [
            java_binary(),
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={node.data_dir / 'log4j2.properties'}",
            "-cp",
            str(libs_dir() / "*"),
            main,
            *args,
        ]

    def _format(self, node: _Node) -> None:
        scram = [
            arg
            for name, password in self.scram_users.items()
            for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]")
        ]
        command = self._java(
            node,
            "kafka.tools.StorageTool",
            "format",
            "--config",
            str(node.data_dir / "server.properties"),
            # One argument: an id may start with '-', which would read as an option.
            f"--cluster-id={self.cluster_id}",
            "--ignore-formatted",
            *scram,
        )
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ConfigError(f"formatting Kafka node {node.node_id} failed:\n{result.stderr}")

    def _launch(self, node: _Node) -> None:
        if node.log is not None:
            node.log.close()
        node.log = node.log_path.open("ab")
        node.process = subprocess.Popen(
            self._java(node, "kafka.Kafka", str(node.data_dir / "server.properties")),
            stdin=subprocess.DEVNULL,
            stdout=node.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is the launcher's to pass on
        )

    def _wait_started(self, node: _Node, deadline: float, offset: int = 0) -> None:
        while time.monotonic() < deadline:
            if node.process is None or node.process.poll() is not None:
                break
            with node.log_path.open("rb") as log:
                log.seek(offset)
                if _STARTED_LINE in log.read():
                    port = node.ports["PLAINTEXT"]
                    if wait_for_port(LOOPBACK, port, max(0.1, deadline - time.monotonic())):
                        return
            time.sleep(0.1)
        code = node.process.poll() if node.process is not None else None
        tail = node.log_path.read_bytes()[-3000:].decode(errors="replace")
        self.stop()
        raise ConfigError(
            f"Apache Kafka node {node.node_id} did not start (exit code {code}); its log ends:"
            f"\n{tail}"
        )

    @staticmethod
    def _reap(node: _Node, timeout_s: float) -> None:
        process = node.process
        if process is not None:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if node.log is not None:
            node.log.close()
            node.log = None


def _cluster_id() -> str:
    # A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.ops.services.apache_kafka install``: fetch the jars (set-up)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["install"]:
        print("usage: python -m training.ops.services.apache_kafka install", file=sys.stderr)
        return 2
    try:
        path = install(quiet=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Apache Kafka {kafka_version()}: {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
