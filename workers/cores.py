"""`rank_cores` / `pin_rank`: each rank of an expert-parallel group on CPU cores of its own;
`set_niceness`: a rank's process below the serving plane in the scheduler's eyes.

Why pin: ranks of a gloo group on one machine meet at every MoE layer (four all-to-alls), and a
collective finishes only when each side's gloo threads have run. Left to the scheduler, a
rank's threads wander over the cores and queue behind the other rank's compute: on a 2-core VM
a tiny all-to-all between two ranks computing in turn took 160-210 us p50 and 1.4-2.3 ms p90;
with each rank (and the gloo threads it then starts, which inherit the mask) on a core of its
own, 114-136 us p50 and 0.24-0.31 ms p90.

Why nice: where ranks share cores with the Router (a CPU node; any node whose host cores are
busy), a waking Router competed with the ranks' compute at equal weight (Ray starts every worker
at nice 15), so the calls of a burst it must turn away at once waited behind rank steps. With
the serving plane at nice 0 (`cluster/embedded.py` RAY_ENV: `RAY_worker_niceness` 0) and the
ranks at 15 (`niceness` of their stage, where Ray would have put them), the Router runs as soon
as it wakes and the ranks have the cores the rest of the time: on a 2-core VM an overload
burst's rejections p99 43-81 -> 12-29 ms, the served tokens/s unchanged (README, "Overload").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

__all__ = ["pin_rank", "rank_cores", "set_niceness"]

log = logging.getLogger(__name__)


def rank_cores(rank: int, threads: int, available: Sequence[int]) -> list[int] | None:
    """Rank `rank`'s cores when every rank up to it gets `threads` of `available` (in order):
    [rank * threads, (rank + 1) * threads); None when there are too few (then nothing is
    pinned: sharing cores is the scheduler's job)."""
    cpus = sorted(available)
    if rank < 0 or threads < 1 or (rank + 1) * threads > len(cpus):
        return None
    return cpus[rank * threads : (rank + 1) * threads]


def pin_rank(rank: int, threads: int) -> list[int] | None:
    """Pin the calling thread (and the threads it starts later) to `rank_cores` of this
    process's CPUs; returns them, or None where it pinned nothing (too few CPUs, no Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = rank_cores(rank, threads, list(os.sched_getaffinity(0)))
    if cores is not None:
        os.sched_setaffinity(0, cores)
        log.info("rank %d pinned to cores %s", rank, cores)
    return cores


def set_niceness(niceness: int) -> int:
    """Run every thread of this process at `niceness` (threads started later inherit it from
    the thread that starts them); returns the calling thread's niceness afterwards. Raising it
    is always allowed; lowering it below where Ray started the process (`RAY_worker_niceness`)
    needs CAP_SYS_NICE, so without it the threads keep their value and a warning says why."""
    if not hasattr(os, "setpriority"):
        return 0
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        threads = [0]
    refused = False
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except PermissionError:
            refused = True
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if refused:
        log.warning(
            "could not lower this rank's niceness to %d (it stays %d): start Ray's workers at "
            "nice 0 (RAY_worker_niceness=0) or grant CAP_SYS_NICE",
            niceness,
            now,
        )
    return now
