"""Run a function on N spawned processes (torch.multiprocessing) with a bounded wait.

Children write `<time>.rank<r>.err` (traceback) into `tmp` when they fail (`gloo_rank` does it);
the parent fails the test with all of them, oldest first, instead of a bare "process exited"."""

from __future__ import annotations

import contextlib
import datetime
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, tmp: str | Path, timeout_s: float = 60) -> Iterator[None]:
    """A spawned child's gloo group (file rendezvous in `tmp`, one torch thread). A failure's
    traceback goes to `{time}.rank{r}.err` before the group is torn down: a failing rank makes
    its peers fail too ("connection closed by peer"), and the parent shows every traceback,
    oldest first, so the root cause comes first."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmp}/rendezvous",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        yield
    except BaseException:
        err = Path(tmp, f"{time.monotonic_ns()}.rank{rank}.err")  # system-wide clock on Linux
        err.write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
