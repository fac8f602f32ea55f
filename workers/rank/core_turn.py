"""`CoreTurn`: the gangs on one node take turns at its cores, one engine step at a time.

Where prefill and decode ranks share a CPU node, both stages stepping at once oversubscribe the
cores: each step's threads are descheduled mid-matmul, their OpenMP peers wait for them, and
both stages slow down more than they share (measured in the README). Taking turns per step
turns that into clean alternation: the gang whose turn it is has every core, the others wait in
the kernel (no CPU). Under contention two gangs strictly alternate, so a long prefill step
cannot starve decoding nor the other way round; a gang alone never waits.

Two advisory `flock`s on files in `/dev/shm` (one namespace per node, so per node by itself):
`gate` then `core`. A waiter holds `gate` while it blocks on `core`, so the holder that lets go
of `core` cannot take it back before the waiter had its turn (it blocks on `gate` first). The
kernel drops a dead process's locks, so a killed rank never leaves the node locked.

A frozen holder (SIGSTOP, a hung kernel) is not dead: its locks stay. So no step waits for the
turn longer than `wait_s` (well under the collective timeout, which would otherwise fail the
waiting gang): past it the step runs without the turn, and so do the next ones, at once, until
the turn is free again (the blocking wait goes on in a helper thread, which gives it back the
moment it gets it). Only one rank per gang takes the turn (its rank 0): the others are held at
the step's first collective by it. GPU nodes leave this off: each stage owns its device.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["CoreTurn"]

log = logging.getLogger(__name__)
_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


class _Ask:
    def __init__(self) -> None:
        self.granted = threading.Event()
        self.abandoned = False


class CoreTurn:
    """A context manager around one step: `with turn: engine.step()`; `held` says whether the
    step got the turn (False only while a frozen process holds it)."""

    def __init__(self, name: str, directory: Path = _DIR, wait_s: float = 2.5) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)  # per user: the files are 0600
        stem = directory / f"moe-cluster-{os.getuid()}-{safe}"
        self._gate, self._core = (
            os.open(f"{stem}.{part}", os.O_RDWR | os.O_CREAT, 0o600) for part in ("gate", "core")
        )
        self.wait_s = wait_s
        self.held = False
        self.steps_without = 0  # steps run without the turn (a frozen holder)
        self._mu = threading.Lock()
        self._stuck = False  # an abandoned wait is still blocked in the helper
        self._asks: queue.SimpleQueue[_Ask | None] = queue.SimpleQueue()
        self._helper = threading.Thread(target=self._wait_loop, name="core-turn", daemon=True)
        self._helper.start()

    def __enter__(self) -> CoreTurn:
        if self._stuck:
            self.steps_without += 1
            return self
        if self._try():
            self.held = True
            return self
        ask = _Ask()
        self._asks.put(ask)
        ask.granted.wait(self.wait_s)
        with self._mu:
            if ask.granted.is_set():
                self.held = True
                return self
            ask.abandoned = self._stuck = True
        self.steps_without += 1
        log.warning("no turn at the cores within %.1f s: stepping without it", self.wait_s)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self._core, fcntl.LOCK_UN)

    def close(self) -> None:
        self._asks.put(None)
        self._helper.join(1.0)  # a helper blocked on a frozen holder stays behind (a daemon)
        if not self._helper.is_alive():
            os.close(self._gate)
            os.close(self._core)

    def _try(self) -> bool:
        """The turn without blocking when nobody holds or waits for it. Past the gate but not
        the core, the gate stays held for the helper's wait (the same open file: its lock call
        returns at once), so no holder can slip in between."""
        try:
            fcntl.flock(self._gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            fcntl.flock(self._core, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        return True

    def _wait_loop(self) -> None:
        while (ask := self._asks.get()) is not None:
            fcntl.flock(self._gate, fcntl.LOCK_EX)  # blocking calls release the GIL
            try:
                fcntl.flock(self._core, fcntl.LOCK_EX)
            finally:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
            with self._mu:
                if ask.abandoned:  # the step went on without it: the turn is free again
                    fcntl.flock(self._core, fcntl.LOCK_UN)
                    self._stuck = False
                else:
                    ask.granted.set()
