"""Expert-parallel dispatch + combine on spawned gloo ranks (CPU): latency and wire bytes.

    python bench/dispatch.py [--worlds 2,4] [--tokens 256] [--hidden 2048] [--iters 30]

DeepSeek-V3-shaped routing: E=256 experts in 8 groups, top-4 groups, top-8 experts (sigmoid
gating on random logits), experts in contiguous slices per rank, T tokens per rank.
Columns:
- dispatch+combine: median over iterations of the slowest rank's time for one dispatch and one
  combine (no expert compute: the received rows are sent straight back).
- raw a2a: the same x bytes moved by two bare gloo `all_to_all_single` calls (there and back)
  with the same splits and preallocated buffers; overhead = dispatch+combine / raw a2a.
- transport: the dispatcher's (--transport): "shm", rows through shared memory
  (workers/moe/shm_exchange.py), or "collective", gloo's all-to-alls.
- wire B/token: x bytes sent to other ranks per token (self rows excluded), deduplicated per
  (token, rank) as the dispatcher sends; naive: one row per (token, remote expert) pair.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.cores import pin_rank
from workers.moe.dispatch import AllToAllDispatcher
from workers.moe.gating import grouped_sigmoid_topk

E, K, GROUPS, TOPK_GROUPS = 256, 8, 8, 4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def slowest_median(times: list[float]) -> float:
    """Per-rank per-iteration seconds -> median over iterations of the max over ranks, in ms."""
    per_rank: list[list[float]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(per_rank, times)
    return 1e3 * statistics.median(max(it) for it in zip(*per_rank, strict=True))


def timed(fn, iters: int, warmup: int = 3) -> list[float]:
    out = []
    for i in range(warmup + iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


def run_rank(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    if args.pin:  # as the offline EP group and served gangs do (workers/cores.py)
        pin_rank(rank, 1)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    e2r = torch.arange(E) // (E // world)  # [E] contiguous slices
    g = torch.Generator().manual_seed(rank)
    logits = torch.randn(args.tokens, E, generator=g)
    ids, weights = grouped_sigmoid_topk(logits, torch.zeros(E), K, GROUPS, TOPK_GROUPS, True, 2.5)
    rows = []
    for (name, dtype), transport in itertools.product(DTYPES.items(), args.transport.split(",")):
        x = torch.randn(args.tokens, args.hidden, generator=g).to(dtype)  # [T, H]
        dispatcher = AllToAllDispatcher(e2r, transport=transport)
        transport = "shm" if dispatcher.shm is not None else "collective"

        def dispatch_combine(x=x, d=dispatcher):
            with torch.inference_mode():  # as the engine runs it (the ep.cpp kernels on)
                got = d.dispatch(x, ids, weights)
                d.combine(got.recv_x, got.handle)

        t_dc = slowest_median(timed(dispatch_combine, args.iters))
        h = dispatcher.dispatch(x, ids, weights).handle
        send = x.index_select(0, h.send_token)  # [S, H]
        recv = send.new_empty(sum(h.recv_splits), args.hidden)  # [R, H]

        def raw(send=send, recv=recv, h=h):
            dist.all_to_all_single(recv, send, h.recv_splits, h.send_splits)
            dist.all_to_all_single(send, recv, h.send_splits, h.recv_splits)

        t_raw = slowest_median(timed(raw, args.iters))
        row_bytes = args.hidden * x.element_size()
        counts = torch.tensor(
            [
                dispatcher.counters.last[0].bytes_sent,
                int((e2r[ids] != rank).sum()) * row_bytes,  # naive: every remote (token, expert)
            ]
        )
        dist.all_reduce(counts)
        dedup, naive = (int(c) / (world * args.tokens) for c in counts)
        rows.append(
            [world, name, transport, t_dc, t_raw, t_dc / t_raw, dedup, naive, naive / dedup]
        )
        dispatcher.close()
        dist.barrier()
    if rank == 0:
        Path(tmp, "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,4", help="comma-separated numbers of ranks")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument(
        "--transport",
        default="shm,collective",
        help="dispatcher transports to compare (workers/moe/dispatch.py TRANSPORTS)",
    )
    p.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=True, help="a core per rank"
    )
    args = p.parse_args()
    print(
        f"E={E} top-{K} ({GROUPS} groups, top-{TOPK_GROUPS}), T={args.tokens}/rank, "
        f"H={args.hidden}, gloo on CPU, median of {args.iters}\n"
    )
    print(
        "| ranks | dtype | transport | dispatch+combine ms | raw a2a ms | overhead | "
        "wire B/token | naive B/token | dedup ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for world in (int(w) for w in args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(run_rank, (world, args, tmp), nprocs=world, start_method="spawn")
            for w, name, tr, t_dc, t_raw, ratio, dedup, naive, dr in json.loads(
                Path(tmp, "rows.json").read_text()
            ):
                print(
                    f"| {w} | {name} | {tr} | {t_dc:.2f} | {t_raw:.2f} | {ratio:.2f}x "
                    f"| {dedup:,.0f} | {naive:,.0f} | {dr:.2f}x |"
                )


if __name__ == "__main__":
    main()
