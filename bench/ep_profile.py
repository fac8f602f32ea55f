"""cProfile of rank 0 in a 2-rank expert-parallel group (spawned processes, gloo): where an EP
step's time goes (expert bmm, dense matmuls, collective waits).

    python -m bench.ep_profile [--arch qwen3_moe] [--shape bench|peer] [--new-tokens 24]
                               [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import time

import torch
import torch.multiprocessing as mp

from bench.offline import checkpoint


def _rank(rank: int, world: int, port: int, path: str, new: int, threads: int) -> None:
    from workers.engine import SamplingParams
    from workers.ep_rank import ExpertParallelRank

    member = ExpertParallelRank(
        path,
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        threads=threads,
        pin_cores=True,
    )
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (64, 64), generator=gen).tolist()
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    share = [(f"p{i}", p, params) for i, p in enumerate(prompts) if i % world == rank]
    profile = cProfile.Profile()
    start = time.perf_counter()
    if rank == 0:
        profile.enable()
    member.generate(share)
    if rank == 0:
        profile.disable()
        print(f"rank 0: {time.perf_counter() - start:.2f} s", flush=True)
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    member.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--shape", default="bench", choices=["bench", "peer"])
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    path = str(checkpoint(args.arch, args.shape))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, path, args.new_tokens, args.threads), nprocs=2)


if __name__ == "__main__":
    main()
