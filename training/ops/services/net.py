"""Loopback ports: a free one, and waiting until one accepts connections."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Final

LOOPBACK: Final = "127.0.0.1"
_POLL_INTERVAL_S: Final = 0.05


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """Poll until a TCP connection to ``host:port`` succeeds; False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(_POLL_INTERVAL_S)
    return False
