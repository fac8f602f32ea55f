"""A 16-byte all-to-all between two spawned gloo ranks, idle and between ~0.3 ms of compute on
each, with and without each rank pinned to a core of its own (workers/cores.py).

    python -m bench.gloo_latency
"""

from __future__ import annotations

import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.cores import pin_rank


def _rank(rank: int, port: int, pin: bool) -> None:
    if pin:
        pin_rank(rank, 1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    send, recv = torch.ones(2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    for busy in (False, True):
        times = []
        for _ in range(400):
            if busy:
                for _ in range(3):
                    a @ b
            start = time.perf_counter()
            dist.all_to_all_single(recv, send)
            times.append(time.perf_counter() - start)
        if rank == 0:
            p50, p90 = statistics.median(times), sorted(times)[int(0.9 * len(times))]
            print(f"pinned={pin} busy={busy}: p50 {1e6 * p50:.0f} us, p90 {1e6 * p90:.0f} us")
    dist.destroy_process_group()


def main() -> None:
    for pin in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(port, pin), nprocs=2)


if __name__ == "__main__":
    main()
