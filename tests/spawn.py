"""Run a function on N spawned processes (torch.multiprocessing) with a bounded wait.

Children write `<rank>.err` (traceback) into `tmp` when they fail; the parent fails the test with
all of them, oldest first, instead of a bare "process exited"."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def run_spawned(fn: Callable, args: tuple, nprocs: int, tmp: Path, timeout_s: float) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{nprocs} spawned ranks did not finish in {timeout_s} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        errs = sorted(Path(tmp).glob("*.err"), key=lambda f: int(f.name.split(".")[0]))
        pytest.fail("\n".join(f.read_text() for f in errs) or str(err), pytrace=False)
