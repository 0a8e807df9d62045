"""Loopback ports for servers this project starts itself (emulator, control plane, proxies).

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, the same range
every outgoing connection draws its source port from. Between choosing such a port and the
server binding it, any client on the machine (a controller dialling the API server, etcd's
own clients) can take it, and the server fails with "address already in use". Ports below
the ephemeral range are never handed to clients, so only another server can race for them.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
_given: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default lower bound


def unused_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range, not given before by this process."""
    high = _ephemeral_low()
    with _lock:
        for _ in range(1000):
            port = random.randrange(_LOWEST, high) if high > _LOWEST + 100 else random.randrange(1024, 65536)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise RuntimeError(f"no unused port on {host} below {high}")
