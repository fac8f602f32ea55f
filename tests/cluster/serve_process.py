"""`moe-cluster serve` as a child process whose output is read line by line, with bounded waits."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

__all__ = ["BIN", "ServeProcess", "iter_queue"]

BIN = Path(sys.executable).parent


class ServeProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "moe-cluster"), "serve", *args],
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        tail = "".join(self.seen[-30:])
        pytest.fail(f"`moe-cluster serve` never printed {text!r} in {timeout_s} s:\n{tail}")


def iter_queue(q: queue.Queue[str]):
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return
