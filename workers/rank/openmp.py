"""`release_thread_pool`: free the calling thread's OpenMP worker threads.

Why a rank needs it: a rank loads its model on one thread (the replica's) and steps it on
another (its loop), and each host thread that runs a parallel region keeps a pool of OpenMP
workers of its own. GNU OpenMP (the runtime torch's wheels ship) counts every pool's workers,
and once it manages more threads than the process has CPUs it throttles its spin-wait from
~300,000 spins to 100: the loop's workers then sleep between parallel regions and every region
pays a futex wake-up. Alone that costs little (2 threads used 174% of the cores instead of
200%), beside other processes much more, a woken worker waiting for a core another process took
(the 1 + 1 cluster at 32 streams: 0.75-0.80x of the offline engine before, 0.82-0.85x after).
Freeing the loading thread's pool once its work is done leaves one pool, the loop's: OpenMP
5.0 `omp_pause_resource_all(omp_pause_soft)` does that for the calling thread (a later parallel
region there builds a new pool).
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache

__all__ = ["openmp_runtime", "release_thread_pool"]

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_RUNTIMES = ("libgomp", "libiomp5", "libomp")  # GNU, Intel, LLVM: all export the 5.0 call


@cache
def openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's), or None (none loaded, not Linux,
    or too old to have `omp_pause_resource_all`)."""
    import torch  # noqa: F401 - loads the runtime torch links against

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(_RUNTIMES):
            lib = ctypes.CDLL(path)  # the loaded copy: dlopen returns its handle
            if hasattr(lib, "omp_pause_resource_all"):
                return lib
    return None


def release_thread_pool() -> bool:
    """Free the OpenMP workers of the calling thread; True when they were freed. Call it on a
    thread that is done with parallel work for a while (it may run more: a new pool is built)."""
    lib = openmp_runtime()
    if lib is None:
        return False
    rc = lib.omp_pause_resource_all(OMP_PAUSE_SOFT)
    if rc != 0:  # inside a parallel region, or the runtime refused
        log.debug("omp_pause_resource_all returned %d", rc)
    return rc == 0
