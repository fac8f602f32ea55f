"""Overload: 10 x router.max_queued_requests Generate calls at once against the cluster.

    python -m bench.overload [--bound 8] [--rounds 3] [--new-tokens 48] [--gang-size 2]
    python -m bench.overload --stand-in     # the Router's gRPC server alone, nothing admitted

The cluster (1 prefill gang + 1 decode gang of --gang-size ranks, tiny DeepSeek-V3) admits
--bound calls; every other one must get RESOURCE_EXHAUSTED at once. The calls are issued from
one thread without waiting, each call's end is stamped by grpc's own thread (add_done_callback),
so the figures are the cluster's: per round, how many were admitted and finished with all their
tokens, and the rejection latency (send -> status) p50 / p99 / max.

--stand-in: no cluster; the Router's own gRPC server (`router/server.py` over the real
`InferenceServicer`, admitting nothing) in a child process, the same bursts against it, and the
server's CPU per rejected call: the floor a rejection costs in grpc.aio on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc

from bench.serve import deployed, percentile
from cluster.config import ClusterConfig
from cluster.net import free_port
from cluster.tiny import make_tiny
from router.client import generate_request
from router.proto import inference_pb2_grpc as pbg


def burst(target: str, n: int, new: int) -> tuple[list[int], list[float]]:
    """n calls at once: (tokens of each admitted call, rejection latencies in s)."""
    sent, ended = [0.0] * n, [0.0] * n
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pbg.InferenceStub(channel)
        calls = []
        for i in range(n):
            req = generate_request(
                prompt_token_ids=[4, i % 50] * 4, max_tokens=new, ignore_eos=True
            )
            sent[i] = time.perf_counter()
            call = stub.Generate(req, timeout=300)
            call.add_done_callback(lambda _c, i=i: ended.__setitem__(i, time.perf_counter()))
            calls.append(call)
        admitted, rejected = [], []
        for i, call in enumerate(calls):
            try:
                admitted.append(sum(len(m.token_ids) for m in call))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                rejected.append(ended[i] - sent[i])
    return admitted, rejected


def _stand_in_server(port: int, ready, stop) -> None:
    from router.server import GrpcFrontDoor
    from router.servicer import InferenceServicer, ModelDescription, RouterSettings
    from workers.engine.inputs import PromptLimits

    servicer = InferenceServicer(
        lambda: None,  # never reached: every call is turned away at admission
        tokenizer=None,
        limits=PromptLimits(512, 4096, None),
        model=ModelDescription("stand-in", "", 512, 4096, 8, 2, "float32"),
        settings=RouterSettings(max_inflight=0),
    )
    door = GrpcFrontDoor(servicer, port=port, host="127.0.0.1").start()
    ready.set()
    stop.wait(600)
    door.stop(0)


def stand_in(bound: int, rounds: int) -> None:
    import multiprocessing as mp

    import psutil

    port = free_port()
    ctx = mp.get_context("spawn")  # a fresh interpreter: no grpc state shared with this one
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_stand_in_server, args=(port, ready, stop))
    child.start()
    try:
        assert ready.wait(60), "the stand-in server did not start"
        server = psutil.Process(child.pid)
        burst(f"127.0.0.1:{port}", 2, 4)  # warm-up
        print(f"stand-in Router server, {10 * bound} calls at once, every one turned away")
        print("| round | rejection p50 / p99 / max ms | server CPU µs per call |")
        print("|---:|---:|---:|")
        for r in range(rounds):
            cpu0 = sum(server.cpu_times()[:2])
            _, rejected = burst(f"127.0.0.1:{port}", 10 * bound, 4)
            cpu = (sum(server.cpu_times()[:2]) - cpu0) / len(rejected) * 1e6
            ms = [percentile(rejected, q) * 1e3 for q in (50, 99, 100)]
            print(f"| {r + 1} | {ms[0]:.0f} / {ms[1]:.0f} / {ms[2]:.0f} | {cpu:.0f} |", flush=True)
    finally:
        stop.set()
        child.join(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bound", type=int, default=8, help="router.max_queued_requests")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--gang-size", type=int, default=2)
    ap.add_argument("--stand-in", action="store_true", help="the Router's server alone")
    args = ap.parse_args()
    if args.stand_in:
        stand_in(args.bound, args.rounds)
        return
    path = Path(tempfile.mkdtemp()) / "tiny"
    make_tiny("deepseek_v3", path, seed=0)
    port = free_port()
    cfg = ClusterConfig.from_args(
        {
            "model": {"path": str(path)},
            "prefill": {"gang_size": args.gang_size},
            "decode": {"gang_size": args.gang_size},
            "router": {"port": port, "max_queued_requests": args.bound},
        }
    )
    with deployed(cfg, timeout_s=600) as target:
        burst(target, 2, 4)  # warm-up
        print(f"{10 * args.bound} calls at once, router.max_queued_requests {args.bound}")
        print("| round | admitted, all tokens | rejected | rejection p50 / p99 / max ms |")
        print("|---:|---:|---:|---:|")
        for r in range(args.rounds):
            admitted, rejected = burst(target, 10 * args.bound, args.new_tokens)
            whole = sum(t == args.new_tokens for t in admitted)
            ms = [percentile(rejected, q) * 1e3 for q in (50, 99, 100)]
            print(
                f"| {r + 1} | {whole} of {len(admitted)} | {len(rejected)} | "
                f"{ms[0]:.0f} / {ms[1]:.0f} / {ms[2]:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
