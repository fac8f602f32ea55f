"""Small network helpers shared by the launcher, the rendezvous, tests and benchmarks."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

# Where free_port looks first: above Ray's default worker ports (10002-19999) and below the
# usual ephemeral range (Linux: 32768-60999), away from Kubernetes' NodePorts (30000-32767).
QUIET_PORTS = range(20000, 30000)
TRIES = 64


def _ephemeral_ports() -> range:
    """The OS's range for port-0 binds and outgoing connections (Linux), else the IANA one."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(lo), int(hi) + 1)
    except (OSError, ValueError):
        return range(49152, 65536)


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now. Taken outside the OS's ephemeral range when one is
    free there: a port the OS hands out itself (to the port-0 binds and outgoing connections of
    Ray's many processes) could be taken between this call and the bind that follows, which
    once failed a Router's start. Another process may still take it later."""
    ephemeral = _ephemeral_ports()
    quiet = [p for p in QUIET_PORTS if p not in ephemeral]
    for port in random.sample(quiet, min(TRIES, len(quiet))):
        if _bindable(host, port):
            return port
    with socket.socket() as s:  # every quiet port tried is taken: let the OS pick
        s.bind((host, 0))
        return int(s.getsockname()[1])
