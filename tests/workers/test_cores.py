"""Each rank of a CPU expert-parallel group on cores of its own (workers/cores.py)."""

from __future__ import annotations

import os
import threading

import pytest

from workers.cores import pin_rank, rank_cores


def test_ranks_get_consecutive_cores_of_what_is_available():
    assert rank_cores(0, 1, [0, 1]) == [0]
    assert rank_cores(1, 1, [1, 0]) == [1]
    assert rank_cores(1, 2, [3, 5, 7, 9]) == [7, 9]  # by position in the sorted set, not id


@pytest.mark.parametrize(
    ("rank", "threads", "available"), [(2, 1, [0, 1]), (1, 2, [0, 1, 2]), (0, 0, [0]), (-1, 1, [0])]
)
def test_too_few_cores_pin_nothing(rank, threads, available):
    assert rank_cores(rank, threads, available) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pinning_covers_the_threads_started_after_it():
    seen: dict[str, object] = {}

    def worker() -> None:
        cores = pin_rank(0, 1)
        child = threading.Thread(target=lambda: seen.update(child=os.sched_getaffinity(0)))
        child.start()
        child.join(10)
        seen.update(cores=cores, own=os.sched_getaffinity(0))

    before = os.sched_getaffinity(0)
    t = threading.Thread(target=worker)  # a thread of its own: the test process keeps its cores
    t.start()
    t.join(10)
    first = {sorted(before)[0]}
    assert seen["cores"] == sorted(first)
    assert seen["own"] == first and seen["child"] == first
    assert os.sched_getaffinity(0) == before


def test_served_ranks_pin_only_on_cpu_under_core_turns():
    from workers.rank.build import turn_pinning

    assert turn_pinning("moe-turn", "cpu")
    assert not turn_pinning(None, "cpu")  # without turns several gangs may step at once
    assert not turn_pinning("moe-turn", "cuda:0")


_NICENESS_CHILD = """
import os, sys, threading
from workers.cores import set_niceness

def nice(tid=0):
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except ProcessLookupError:  # a thread that ended meanwhile
        return None

started = threading.Event()
stop = threading.Event()
before = threading.Thread(target=lambda: (started.set(), stop.wait(30)), daemon=True)
before.start()
started.wait(30)
got = set_niceness(int(sys.argv[1]))
after = []
t = threading.Thread(target=lambda: after.append(nice()))
t.start(); t.join(30)
threads = {int(x): nice(int(x)) for x in os.listdir("/proc/self/task")}
threads = {t: n for t, n in threads.items() if n is not None}
stop.set(); before.join(30)
print(got, after[0], sorted(set(threads.values())), len(threads))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux only")
def test_niceness_covers_every_thread_and_the_ones_started_after_it():
    """A child process (niceness cannot be lowered again without privilege): a thread started
    before the call, the caller and a thread started after it all run at the new value."""
    import subprocess
    import sys

    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    proc = subprocess.run(
        [sys.executable, "-c", _NICENESS_CHILD, str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split(maxsplit=2)
    got, after, rest = int(out[0]), int(out[1]), out[2]
    assert (got, after) == (target, target)
    assert rest.startswith(f"[{target}] ") and int(rest.split()[-1]) >= 2, rest
