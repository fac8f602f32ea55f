"""`CoreTurn`: under contention the turns alternate (a holder that lets go cannot take the cores
straight back), a gang alone never waits, and a killed holder leaves the node unlocked.

flock locks belong to an open file, so two `CoreTurn`s in one process contend like two ranks;
the threads here stand for rank processes; a real process holds it and is killed by PID."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

from workers.rank.core_turn import CoreTurn

WAIT_S = 30.0


def _wait_for_waiter(tmp_path, name: str) -> None:
    """Until some turn blocks on the cores (a waiter holds the gate meanwhile)."""
    fd = os.open(tmp_path / f"moe-cluster-{os.getuid()}-{name}.gate", os.O_RDWR)
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
            assert time.monotonic() < deadline, "the second turn never started waiting"
    finally:
        os.close(fd)


def test_a_holder_that_lets_go_waits_for_the_waiter(tmp_path):
    a, b = CoreTurn("t", tmp_path, wait_s=WAIT_S), CoreTurn("t", tmp_path, wait_s=WAIT_S)
    order: list[str] = []
    waiter = threading.Thread(
        target=lambda: (b.__enter__(), order.append("b"), b.__exit__(None, None, None))
    )
    with a:
        order.append("a1")
        waiter.start()
        _wait_for_waiter(tmp_path, "t")
    with a:  # straight back: without the gate the holder would usually win here
        order.append("a2")
    waiter.join(WAIT_S)
    assert order == ["a1", "b", "a2"]
    assert a.steps_without == b.steps_without == 0
    a.close()
    b.close()


def test_a_turn_alone_never_waits(tmp_path):
    turn = CoreTurn("alone", tmp_path)
    for _ in range(100):
        with turn:
            assert turn.held
    assert turn.steps_without == 0
    turn.close()


def _holder(tmp_path, name: str) -> subprocess.Popen:
    """Another process that takes the turn and keeps it."""
    code = (
        "import sys, pathlib; from workers.rank.core_turn import CoreTurn\n"
        f"t = CoreTurn({name!r}, pathlib.Path({str(tmp_path)!r})); t.__enter__()\n"
        "print('in', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "in\n"
    return holder


def test_a_killed_holder_leaves_the_cores_free(tmp_path):
    holder = _holder(tmp_path, "k")
    try:
        turn = CoreTurn("k", tmp_path, wait_s=WAIT_S)
        entered = threading.Event()
        waiter = threading.Thread(target=lambda: (turn.__enter__(), entered.set()), daemon=True)
        waiter.start()
        _wait_for_waiter(tmp_path, "k")
        assert not entered.is_set()
        os.kill(holder.pid, signal.SIGKILL)
        assert entered.wait(WAIT_S), "the cores stayed locked after their holder was killed"
        assert turn.held
        turn.__exit__(None, None, None)
        turn.close()
    finally:
        holder.kill()
        holder.wait(WAIT_S)


def test_a_frozen_holder_costs_one_bounded_wait_then_the_turn_comes_back(tmp_path):
    """A holder that never lets go (a SIGSTOPped rank): one step waits `wait_s`, the next ones
    run without the turn at once, and once the holder is gone the turn is taken again."""
    holder = _holder(tmp_path, "f")
    try:
        turn = CoreTurn("f", tmp_path, wait_s=0.2)
        with turn:
            assert not turn.held
        with turn:
            assert not turn.held
        assert turn.steps_without == 2
        os.kill(holder.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while True:
            with turn:
                if turn.held:
                    break
            assert time.monotonic() < deadline, "the turn never came back after its holder died"
        turn.close()
    finally:
        holder.kill()
        holder.wait(WAIT_S)
