"""A doorbell for the ranks of one host: a 32-bit counter in shared memory that any rank rings
(atomic add + wake every waiter, one futex call) and any rank sleeps on until it changes.

Why: an idle gang used to poll (every rank met its peers in a gloo all-reduce every 2-50 ms, so
a request that reached one rank was never more than 50 ms from a step): ~2.5% of a core per idle
rank, taken from the busy stage on the same cores. With the doorbell an idle rank sleeps until a
peer rings, and a new request reaches a sleeping gang in microseconds.

Linux only (the `futex` system call on a word of a shared mapping); the shared-memory exchange
that holds the word exists only on x86-64 Linux, where the call numbers below hold.
"""

from __future__ import annotations

import ctypes
import mmap
import time

__all__ = ["Doorbell"]

_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT = 0  # shared (not FUTEX_PRIVATE_FLAG): the word is in a mapping of several processes
_FUTEX_WAKE_OP = 5
_ADD_ONE = (1 << 28) | (1 << 12)  # FUTEX_OP(FUTEX_OP_ADD, 1, FUTEX_OP_CMP_EQ, 0)
_WAKE_ALL = 2**31 - 1
_MASK = 2**32 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_syscall = ctypes.CDLL(None, use_errno=True).syscall  # releases the GIL while it waits
_syscall.restype = ctypes.c_long


class Doorbell:
    """The counter at `offset` of `buffer` (4-byte aligned, zeroed when the file was made)."""

    def __init__(self, buffer: mmap.mmap, offset: int) -> None:
        self._word: ctypes.c_uint32 | None = ctypes.c_uint32.from_buffer(buffer, offset)
        self._addr = ctypes.c_void_p(ctypes.addressof(self._word))
        self._raw = 0  # the word when `count` last read it
        self._count = 0

    def count(self) -> int:
        """Rings so far: the 32-bit word unwrapped, the same on every rank (so read it at least
        once per 2**31 rings; one thread of a process only)."""
        raw = self._raw if self._word is None else self._word.value
        self._count += (raw - self._raw) & _MASK
        self._raw = raw
        return self._count

    def ring(self) -> None:
        """Add one to the counter and wake every rank waiting on it (a no-op once closed)."""
        if self._word is None:
            return
        _syscall(
            ctypes.c_long(_SYS_FUTEX),
            self._addr,
            ctypes.c_int(_FUTEX_WAKE_OP),
            ctypes.c_int(_WAKE_ALL),
            ctypes.c_void_p(0),  # no waiter on the second word (the same word) beyond those
            self._addr,
            ctypes.c_int(_ADD_ONE),
        )

    def wait(self, seen: int, timeout_s: float) -> bool:
        """Sleep until the count differs from `seen` (a `count()`) or `timeout_s` passes (a
        signal may end the wait early); True when it differs. Returns at once when it does."""
        if self._word is None:
            time.sleep(timeout_s)
            return False
        seen &= _MASK
        if self._word.value != seen:
            return True
        ts = _Timespec(int(timeout_s), int(timeout_s % 1 * 1e9))
        _syscall(
            ctypes.c_long(_SYS_FUTEX),
            self._addr,
            ctypes.c_int(_FUTEX_WAIT),
            ctypes.c_uint32(seen),
            ctypes.byref(ts),
            ctypes.c_void_p(0),
            ctypes.c_int(0),
        )
        return self._word.value != seen

    def close(self) -> None:
        """Let go of the mapping (it can be unmapped now); rings do nothing after, waits sleep."""
        self._word = None
