"""The gang doorbell (workers/moe/doorbell.py) on a shared file mapped by this process and a
spawned one: a ring from the other process ends a wait at once; a wait without a ring ends at its
timeout; `count()` counts every ring, across the 32-bit wrap; a wait on a stale count returns at
once; a closed doorbell neither rings nor touches the mapping."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

from workers.moe.doorbell import Doorbell
from workers.moe.shm_exchange import shm_supported

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not shm_supported(), reason="doorbell: x86-64 Linux only"),
]

_RINGER = """
import mmap, os, sys
from workers.moe.doorbell import Doorbell
fd = os.open(sys.argv[1], os.O_RDWR)
bell = Doorbell(mmap.mmap(fd, 4096), 64)
sys.stdin.readline()  # the parent is about to wait
bell.ring()
"""


def _mapped(tmp_path) -> tuple[mmap.mmap, str]:
    path = str(tmp_path / "bell")
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, 4096), path
    finally:
        os.close(fd)


def test_a_ring_from_another_process_ends_the_wait(tmp_path) -> None:
    buf, path = _mapped(tmp_path)
    bell = Doorbell(buf, 64)
    seen = bell.count()
    ringer = subprocess.Popen(
        [sys.executable, "-c", _RINGER, path], stdin=subprocess.PIPE, text=True
    )
    try:
        assert ringer.stdin is not None
        ringer.stdin.write("go\n")
        ringer.stdin.flush()
        start = time.monotonic()
        rung = bell.wait(seen, timeout_s=30)
        waited = time.monotonic() - start
        assert ringer.wait(30) == 0
    finally:
        ringer.kill()
    assert rung, "the wait ended without seeing the other process's ring"
    assert waited < 10, f"the ring took {waited:.1f} s to end the wait"
    assert bell.count() == seen + 1
    assert bell.wait(seen, timeout_s=30), "a wait on a stale count must return at once"


def test_a_wait_without_a_ring_ends_at_its_timeout(tmp_path) -> None:
    buf, _ = _mapped(tmp_path)
    bell = Doorbell(buf, 64)
    start = time.monotonic()
    assert not bell.wait(bell.count(), timeout_s=0.2)
    assert 0.15 < time.monotonic() - start < 10


def test_every_ring_counts_across_the_wrap(tmp_path) -> None:
    buf, _ = _mapped(tmp_path)
    buf[64:68] = (2**32 - 2).to_bytes(4, "little")  # two rings before the word wraps
    bell = Doorbell(buf, 64)
    base = bell.count()
    threads = [threading.Thread(target=bell.ring) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert bell.count() - base == 5  # every ring is an atomic add: none lost, none doubled
    assert int.from_bytes(buf[64:68], "little") == 3


def test_a_closed_doorbell_lets_go_of_the_mapping(tmp_path) -> None:
    buf, _ = _mapped(tmp_path)
    bell = Doorbell(buf, 64)
    bell.close()
    bell.ring()  # nothing to ring
    buf.close()  # no export left: the map closes
    assert not bell.wait(0, timeout_s=0.01)
