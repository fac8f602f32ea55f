"""The floor of the token path: what one streamed gRPC message costs a Python server and a
Python client on this machine, with nothing behind the server.

A stand-in `moe.v1.Inference` server (a grpc.aio server on uvloop in a process of its own, as
the Router's front door runs) streams one-token `GenerateResponse`s to C concurrent streams,
all woken together every `--step-ms`: one engine step fanned out, as the Router fans out a
rank's `StepReport`. The clients are `bench.serve`'s own (`AsyncInferenceClient`, one asyncio
loop in this process). Reported: CPU µs per message on each side (from /proc, over the
streaming window only), and what C messages per step then take of one core at that step
period: on a machine whose cores the ranks use fully, CPU that `bench.interference` shows
costing about as much decode time.

    python -m bench.grpc_floor [--streams 32] [--messages 256] [--step-ms 35] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import grpc.aio

from bench.ingress import StandIn
from router.client import AsyncInferenceClient
from router.proto import inference_pb2 as pb
from router.proto import inference_pb2_grpc as pbg

_TICKS = 1 << 30


class _Ticking(StandIn):
    """`bench.ingress`'s stand-in, every stream sending its next message when the shared step
    ticks."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.tick: asyncio.Future[None] | None = None

    async def run_ticks(self) -> None:
        loop = asyncio.get_running_loop()
        self.tick = loop.create_future()
        for _ in range(_TICKS):
            await asyncio.sleep(self.step_s)
            done, self.tick = self.tick, loop.create_future()
            done.set_result(None)

    async def next_step(self) -> None:
        assert self.tick is not None
        await self.tick

    async def GetModelInfo(self, request: Any, context: Any) -> pb.ModelInfo:  # noqa: N802
        return pb.ModelInfo(architecture="stand-in")


async def _serve(port: int, step_s: float) -> None:
    servicer = _Ticking(step_s)
    server = grpc.aio.server()
    pbg.add_InferenceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ticks = asyncio.create_task(servicer.run_ticks())
    print("ready", flush=True)
    await server.wait_for_termination()
    ticks.cancel()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _clients(target: str, streams: int, messages: int, server_pid: int) -> tuple:
    got = [0] * streams

    async def one(client: AsyncInferenceClient, i: int) -> None:
        async for chunk in client.generate(prompt_token_ids=[5, 6], max_tokens=messages):
            got[i] += len(chunk.token_ids)

    async with AsyncInferenceClient(target, timeout_s=600) as client:
        await client.model_info()  # connected before the clock starts
        server0, mine0, t0 = _cpu_s(server_pid), _cpu_s(os.getpid()), time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(streams)))
        elapsed = time.perf_counter() - t0
        server1, mine1 = _cpu_s(server_pid), _cpu_s(os.getpid())
    assert sum(got) == streams * messages, got
    return server1 - server0, mine1 - mine0, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--messages", type=int, default=256, help="per stream")
    ap.add_argument("--step-ms", type=float, default=35.0, help="a served 32-row decode step")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process's port
    args = ap.parse_args()
    if args.streams < 1 or args.messages < 1 or args.step_ms <= 0 or args.runs < 1:
        sys.exit("--streams, --messages and --runs need to be at least 1, --step-ms above 0")
    try:
        import uvloop
    except ImportError:  # Serve installs it; without it the default loop
        uvloop = None
    if args.serve is not None:
        (uvloop.run if uvloop else asyncio.run)(_serve(args.serve, args.step_ms / 1e3))
        return

    from cluster.net import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "bench.grpc_floor", "--serve", str(port)]
    server = subprocess.Popen([*cmd, "--step-ms", str(args.step_ms)], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            sys.exit("the stand-in server did not start")
        n = args.streams * args.messages
        print(f"{args.streams} streams x {args.messages} one-token messages, a step every "
              f"{args.step_ms} ms; server grpc.aio{' on uvloop' if uvloop else ''}, clients "
              "bench.serve's (grpc.aio)")  # fmt: skip
        print("| run | messages/s | server µs/msg | client µs/msg | both, % of a core at "
              f"{args.streams} msgs per {args.step_ms} ms |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|")
        for run in range(1, args.runs + 1):
            s, c, elapsed = asyncio.run(_clients(f"127.0.0.1:{port}", args.streams,
                                                 args.messages, server.pid))  # fmt: skip
            per_step = (s + c) / n * args.streams  # CPU s per step
            print(f"| {run} | {n / elapsed:,.0f} | {s / n * 1e6:.0f} | {c / n * 1e6:.0f} | "
                  f"{per_step / (args.step_ms / 1e3):.1%} |")  # fmt: skip
    finally:
        server.kill()
        server.wait(10)


if __name__ == "__main__":
    main()
