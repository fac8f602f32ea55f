"""`release_thread_pool` frees the calling thread's OpenMP workers (their OS threads end), and
torch still computes on that thread afterwards. In a fresh process, so no earlier test's pools
are counted."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import os, time, torch
from workers.rank.openmp import openmp_runtime, release_thread_pool

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(3)
x = torch.ones(4_000_000)
x.add_(1)  # a parallel region: this thread's pool gets 2 workers
before = threads()
assert openmp_runtime() is not None, "no OpenMP runtime with omp_pause_resource_all found"
assert release_thread_pool()
deadline = time.monotonic() + 10
while threads() != before - 2:
    assert time.monotonic() < deadline, f"{threads()} threads, expected {before - 2}"
    time.sleep(0.01)
x.add_(1)  # a new pool, same result
assert float(x.sum()) == 3 * 4_000_000
print("ok")
"""


def test_release_frees_the_calling_threads_workers_and_torch_still_computes():
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
