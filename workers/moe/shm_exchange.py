"""All-to-all of byte messages between the CPU ranks of one host, through shared memory.

Why: on CPU the expert-parallel dispatch ran over gloo, whose every collective is a round trip
through loopback TCP and gloo's own threads: 150-280 µs at p50 and ~0.5 ms at p90 between two
busy ranks pinned to their cores (`bench/gloo_latency.py`), four of them per MoE layer. Here a
message is copied into a ring in a shared file and published by one 8-byte store; the receiver
sees it after a few µs of polling (`bench/dispatch.py` has the figures). The counts exchange
disappears too: a message carries its own length.

Layout of the file (created by rank 0 in /dev/shm, mapped by every rank, unlinked once all have
mapped it, so nothing outlives the processes): a control page, then one ring per directed pair
(src, dst), src != dst, of `RING` slots of [total bytes int64, chunk bytes int64, data]. For each
pair `head` (chunks published, written by src only) and `tail` (chunks consumed, written by dst
only) sit on cache lines of their own; each rank has a `closed` flag; the gang's `doorbell`
(workers/moe/doorbell.py) has a line too. A message longer than a
slot goes as several chunks; `exchange` moves every pair's chunks in one progress loop, so two
ranks sending each other more than a ring holds never wait on each other.

Ordering: x86-64 only (total store order: the data stores are visible before the head store
that publishes them; a locked instruction, `_fence`, also orders any non-temporal stores of the
copy). Elsewhere `create` returns None and the caller keeps its process-group collectives.

Waiting: a short spin, then a futex sleep on the rank's own waker word, its `asleep` flag set;
a rank that moves a head or tail reads the peer's flag (after a fence) and wakes it. So a
waiting rank leaves its core to whatever else is runnable (the router, another stage) instead of
spinning or yielding on it, and wakes as soon as the peer moves, not at the end of a sleep (a
gang's rank whose rank 0 waits for the core turn, i.e. for the other stage's whole step, does
not touch the core meanwhile). Every 10 ms it checks that every peer process is still running
and has not closed, and fails after `timeout_s` (the group's collective timeout), so a dead or
stuck peer fails the rank as gloo would.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from workers.moe.doorbell import Doorbell

__all__ = ["PeerLost", "ShmExchange", "shm_supported"]

RING = 4  # slots per directed pair
SLOT_HEADER = 16  # total bytes, chunk bytes (int64 each)
MAX_CHUNK = 256 << 10  # data bytes per slot
MIN_CHUNK = 16 << 10
BUDGET = 16 << 20  # data bytes over all rings: /dev/shm is often small in containers
LINE = 64  # bytes: head, tail and each closed flag on a cache line of their own
SPIN = 50  # polls before sleeping until a peer moves
CHECK_S = 10e-3  # peer liveness and the timeout, this often while waiting
_FENCE = threading.Lock()  # acquire/release: a locked instruction, a full fence on x86


class PeerLost(RuntimeError):
    """A peer rank exited, closed its end, or did not take part within the timeout."""


def shm_supported() -> bool:
    """This process may use the shared-memory exchange: x86-64 Linux with /dev/shm, not turned
    off by MOE_SHM_DISPATCH=0."""
    return (
        os.environ.get("MOE_SHM_DISPATCH", "1") != "0"
        and platform.machine().lower() in ("x86_64", "amd64")
        and os.path.isdir("/dev/shm")
    )


def _host_id() -> str:
    """Equal for processes that share one kernel, /dev/shm (the IPC namespace) and process ids
    (the PID namespace: peers are watched by pid); hostname alone repeats across containers."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("")
    for ns in ("ipc", "pid"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            parts.append("")
    return "/".join(parts)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")  # a killed process not yet reaped is a zombie


def _fence() -> None:
    with _FENCE:
        pass


class ShmExchange:
    """`exchange(sends)`: every rank gives one message (a list of tensors, sent as their bytes
    back to back) for each other rank and gets one byte message from each. Collective: every
    rank of the group calls it, in the same order, like any collective.

    Build it with `create(group)` (collective; None on every rank when it cannot be used)."""

    def __init__(
        self,
        buffer: mmap.mmap,
        rank: int,
        world: int,
        pids: Sequence[int],
        chunk: int,
        timeout_s: float,
        path: str = "",
    ) -> None:
        self.rank, self.world, self.chunk, self.timeout_s = rank, world, chunk, timeout_s
        self.path = path  # the file, unlinked once every rank has mapped it
        self._mmap = buffer
        self._pids = list(pids)
        self._ctrl = np.frombuffer(buffer, dtype=np.int64)  # control words and slot headers
        with torch.inference_mode(False):  # written in and out of inference mode alike
            self._data = torch.frombuffer(buffer, dtype=torch.uint8)
        self._slot = SLOT_HEADER + chunk
        self._recv: dict[int, torch.Tensor] = {}  # per source rank, reused (grown, never shrunk)
        self._closed = False
        self.doorbell = Doorbell(buffer, _doorbell_at(world))  # idle ranks sleep on it
        # a rank waiting on its peers sleeps on its waker (flag set) until a peer moves a chunk
        self._wakers = [Doorbell(buffer, _waker_at(world, r)) for r in range(world)]
        self._asleep_at = [(_waker_at(world, r) + 8) // 8 for r in range(world)]
        self._pairs = {
            (a, b): self._pair(a, b) for a in range(world) for b in range(world) if a != b
        }

    # --- setup -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, group: dist.ProcessGroup | None = None, *, timeout_s: float = 120.0, chunk: int = 0
    ) -> ShmExchange | None:
        """Collective over `group` (a CPU group): the exchange when every rank supports it and
        all run on one host and the file could be made; None on every rank otherwise.
        `chunk`: slot data bytes (0: the default for this group size)."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world < 2:
            return None
        mine = (shm_supported(), _host_id(), os.getpid())
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
        if not all(ok for ok, _, _ in everyone) or len({h for _, h, _ in everyone}) != 1:
            return None
        pairs = world * (world - 1)
        chunk = chunk or max(MIN_CHUNK, min(MAX_CHUNK, BUDGET // (pairs * RING)) // 4096 * 4096)
        size = _control_bytes(world) + pairs * RING * (SLOT_HEADER + chunk)
        name = [""]
        if rank == 0:
            name[0] = _make_file(size)
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(name, src=src, group=group)
        buffer = None
        if name[0]:
            with contextlib.suppress(OSError):
                fd = os.open(name[0], os.O_RDWR)
                try:
                    buffer = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
        mapped: list = [None] * world
        dist.all_gather_object(mapped, buffer is not None, group=group)
        if rank == 0 and name[0]:
            with contextlib.suppress(OSError):
                os.unlink(name[0])  # every rank has mapped it (or given up): nothing to leak
        if not all(mapped):
            if buffer is not None:
                buffer.close()
            return None
        assert buffer is not None
        return cls(buffer, rank, world, [p for _, _, p in everyone], chunk, timeout_s, name[0])

    def close(self) -> None:
        """Tell the peers this rank is gone (a peer waiting on it fails at once); unmap."""
        if self._closed:
            return
        self._closed = True
        self._ctrl[self._closed_at(self.rank)] = 1
        self.doorbell.ring()  # a peer asleep on it wakes, finds the group ending
        for waker in self._wakers:  # a peer waiting in an exchange finds it at once
            waker.ring()
        for bell in (self.doorbell, *self._wakers):
            bell.close()
        self._ctrl = None  # type: ignore[assignment]  # the views go before the map
        self._data = None  # type: ignore[assignment]
        self._recv.clear()
        with contextlib.suppress(BufferError):  # a view still held elsewhere: unmapped at exit
            self._mmap.close()

    # --- the exchange ------------------------------------------------------------------------
    def exchange(self, sends: Sequence[Sequence[torch.Tensor] | None]) -> list[torch.Tensor | None]:
        """sends[r]: the tensors (CPU) for rank r, their bytes sent back to back; sends[rank] is
        ignored. Returns [W]: the uint8 message from each rank ([0] when it sent nothing), None
        at this rank's index. The returned tensors are reused: valid until the next exchange."""
        if self._closed:
            raise PeerLost("the shared-memory exchange of this rank is closed")
        me, world = self.rank, self.world
        out: list[torch.Tensor | None] = [None] * world
        outgoing: dict[int, _Outgoing] = {}
        incoming: dict[int, _Incoming] = {}
        for r in range(world):
            if r != me:
                outgoing[r] = _Outgoing(sends[r] or ())
                incoming[r] = _Incoming()
        waiter = _Waiter(self)
        while outgoing or incoming:
            moved = False
            for r in list(outgoing):
                if self._push(r, outgoing[r]):
                    moved = True
                if outgoing[r].done:
                    del outgoing[r]
            for r in list(incoming):
                if self._pull(r, incoming[r]):
                    moved = True
                if incoming[r].done:
                    out[r] = incoming.pop(r).message
            if not moved:
                waiter.pause(set(outgoing) | set(incoming), lambda: self._ready(outgoing, incoming))
            else:
                waiter.progress()
        return out

    def _ready(self, outgoing: dict[int, _Outgoing], incoming: dict[int, _Incoming]) -> bool:
        """Whether a pending pair can move a chunk now (or a peer closed: the wait must end)."""
        ctrl = self._ctrl
        for r in outgoing:
            head_at, tail_at, _ = self._pairs[(self.rank, r)]
            if ctrl[head_at] - ctrl[tail_at] < RING or ctrl[self._closed_at(r)]:
                return True
        for r in incoming:
            head_at, tail_at, _ = self._pairs[(r, self.rank)]
            if ctrl[head_at] > ctrl[tail_at] or ctrl[self._closed_at(r)]:
                return True
        return False

    def _nudge(self, peer: int) -> None:
        """After a head or tail moved: wake `peer` if it sleeps waiting for such a move."""
        _fence()  # the store that moved it before the load of the flag (x86 reorders those)
        if self._ctrl[self._asleep_at[peer]]:
            self._wakers[peer].ring()

    def sleep_until_moved(self, timeout_s: float, ready: Callable[[], bool]) -> None:
        """Sleep until a peer moves a head or tail of this rank's pairs (or `timeout_s`),
        unless `ready()` already holds once this rank has said it sleeps."""
        waker, asleep = self._wakers[self.rank], self._asleep_at[self.rank]
        seen = waker.count()
        self._ctrl[asleep] = 1
        _fence()  # the flag before the re-check: a peer that moved after it sees the flag
        try:
            if not ready():
                waker.wait(seen, timeout_s)
        finally:
            self._ctrl[asleep] = 0

    def _push(self, dst: int, o: _Outgoing) -> bool:
        """Write as many chunks of `o` into the ring to `dst` as it has room for."""
        head_at, tail_at, ring = self._pairs[(self.rank, dst)]
        head = int(self._ctrl[head_at])
        moved = False
        while not o.done and head - int(self._ctrl[tail_at]) < RING:
            base = ring + (head % RING) * self._slot
            n = o.fill(self._data[base + SLOT_HEADER : base + SLOT_HEADER + self.chunk])
            self._ctrl[base // 8], self._ctrl[base // 8 + 1] = o.total, n
            _fence()  # the slot's bytes before the head that publishes them
            head += 1
            self._ctrl[head_at] = head
            moved = True
        if moved:
            self._nudge(dst)
        return moved

    def _pull(self, src: int, i: _Incoming) -> bool:
        """Copy every chunk published by `src` out of the ring into `i`'s message."""
        head_at, tail_at, ring = self._pairs[(src, self.rank)]
        tail = int(self._ctrl[tail_at])
        moved = False
        while not i.done and int(self._ctrl[head_at]) > tail:
            base = ring + (tail % RING) * self._slot
            total, n = int(self._ctrl[base // 8]), int(self._ctrl[base // 8 + 1])
            if i.message is None:
                i.start(self._recv_buffer(src, total))
            i.take(self._data[base + SLOT_HEADER : base + SLOT_HEADER + n])
            tail += 1
            self._ctrl[tail_at] = tail  # the slot may be written again
            moved = True
        if moved:
            self._nudge(src)
        return moved

    def _recv_buffer(self, src: int, n: int) -> torch.Tensor:
        buf = self._recv.get(src)
        if buf is None or buf.numel() < n:
            with torch.inference_mode(False):  # written in and out of inference mode alike
                buf = torch.empty(max(n * 5 // 4, 1), dtype=torch.uint8)
            self._recv[src] = buf
        return buf[:n]

    # --- layout ------------------------------------------------------------------------------
    def _pair(self, src: int, dst: int) -> tuple[int, int, int]:
        """(head index, tail index) into the control words, and the byte offset of the ring."""
        p = src * self.world + dst
        q = src * (self.world - 1) + (dst if dst < src else dst - 1)
        ring = _control_bytes(self.world) + q * RING * self._slot
        return (2 * p * LINE) // 8, ((2 * p + 1) * LINE) // 8, ring

    def _closed_at(self, rank: int) -> int:
        return (2 * self.world * self.world * LINE + rank * LINE) // 8

    def check_peers(self, pending: set[int]) -> None:
        """Raise PeerLost if a rank this exchange waits on has exited or closed its end."""
        for r in sorted(pending):
            if self._ctrl[self._closed_at(r)]:
                raise PeerLost(f"expert-parallel rank {r} left the group")
            if not _running(self._pids[r]):
                raise PeerLost(f"the process of expert-parallel rank {r} exited")


def _control_bytes(world: int) -> int:
    raw = _waker_at(world, world)
    return (raw + 4095) // 4096 * 4096


def _doorbell_at(world: int) -> int:
    """Byte offset of the gang's doorbell word: after the heads, tails and closed flags."""
    return 2 * world * world * LINE + world * LINE


def _waker_at(world: int, rank: int) -> int:
    """Byte offset of `rank`'s waker line: its futex word, then its asleep flag (int64 at +8)."""
    return _doorbell_at(world) + LINE + rank * LINE


def _make_file(size: int) -> str:
    """A new file of `size` bytes in /dev/shm, its pages reserved; "" if there is no room."""
    name = f"/dev/shm/moe-a2a-{uuid.uuid4().hex}"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return ""
    try:
        os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS on a later write
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
        return ""
    os.close(fd)
    return name


class _Outgoing:
    """One message being written: its tensors' bytes, chunk by chunk (at least one chunk, so
    an empty message still arrives)."""

    def __init__(self, parts: Sequence[torch.Tensor]) -> None:
        self.parts = [p.contiguous().view(torch.uint8).reshape(-1) for p in parts if p.numel()]
        self.total = sum(p.numel() for p in self.parts)
        self.part = self.offset = self.sent = 0
        self.done = False

    def fill(self, slot: torch.Tensor) -> int:
        """Copy the next bytes into `slot`; returns how many."""
        n = 0
        while n < slot.numel() and self.part < len(self.parts):
            src = self.parts[self.part]
            take = min(slot.numel() - n, src.numel() - self.offset)
            slot[n : n + take].copy_(src[self.offset : self.offset + take])
            n, self.offset = n + take, self.offset + take
            if self.offset == src.numel():
                self.part, self.offset = self.part + 1, 0
        self.sent += n
        self.done = self.sent == self.total
        return n


class _Incoming:
    def __init__(self) -> None:
        self.message: torch.Tensor | None = None
        self.received = 0
        self.done = False

    def start(self, buffer: torch.Tensor) -> None:
        self.message = buffer
        self.done = buffer.numel() == 0

    def take(self, chunk: torch.Tensor) -> None:
        assert self.message is not None
        n = chunk.numel()
        self.message[self.received : self.received + n].copy_(chunk)
        self.received += n
        self.done = self.received == self.message.numel()


class _Waiter:
    """Spin, then sleep until a peer moves (futex); check the peers and the deadline while
    waiting."""

    def __init__(self, ex: ShmExchange) -> None:
        self.ex = ex
        self.polls = 0
        self.since = 0.0  # when the current wait began (0: not waiting)
        self.check_at = 0.0

    def progress(self) -> None:
        self.polls, self.since = 0, 0.0

    def pause(self, pending: set[int], ready: Callable[[], bool]) -> None:
        self.polls += 1
        if self.polls < SPIN:
            return
        now = time.monotonic()
        if not self.since:
            self.since, self.check_at = now, now + CHECK_S
        if now >= self.check_at:
            self.check_at = now + CHECK_S
            self.ex.check_peers(pending)
            if now - self.since > self.ex.timeout_s:
                ranks = ", ".join(str(r) for r in sorted(pending))
                raise PeerLost(
                    f"expert-parallel rank(s) {ranks} did not take part in an all-to-all within "
                    f"{self.ex.timeout_s:g} s (the collective timeout)"
                )
        self.ex.sleep_until_moved(max(self.check_at - now, 0.0), ready)
