"""The client hop alone: CPU per streamed message of each way to put `moe.v1.Inference` on a
port, with no engine behind it.

A stand-in servicer streams `--messages` one-token `GenerateResponse`s per Generate call, one
per "engine step" (`--step-ms`, all streams tick together like a batch), to C concurrent
clients. Ways measured, each in its own Ray + Serve:

- `proxy`: Serve's gRPC proxy in front of the servicer deployment (Ray 2.60's path: each
  message is one streamed item of a Ray actor call from the replica to the proxy, then one gRPC
  message to the client).
- `replica`: the Serve replica runs a grpc.aio server itself on the port (what the Router does
  since issue 10): one gRPC message per item, no Ray hop.
- `direct`: Serve's experimental direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1`): Serve
  starts a gRPC server inside the ingress replica on a port it allocates (40000+ per replica).

CPU seconds come from psutil per process (the replica, the proxy, the clients in this process).

    .venv/bin/python -m bench.ingress             # --ways proxy,replica,direct --streams 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import psutil

from router.proto import inference_pb2 as pb
from router.proto import inference_pb2_grpc as pbg

SERVICER = "bench.ingress.add_servicer"


class StandIn(pbg.InferenceServicer):
    """Streams `max_tokens` one-token messages, one per shared step tick."""

    step_s = 0.02

    async def next_step(self) -> None:
        """Until this stream's next message is due (here: its own timer)."""
        await asyncio.sleep(self.step_s)

    async def Generate(self, request: Any, context: Any = None):  # noqa: N802
        n = request.sampling.max_tokens
        for i in range(n):
            await self.next_step()
            msg = pb.GenerateResponse(token_ids=[i + 3], text="ab")
            if i == n - 1:
                msg.finish_reason = "length"
                msg.usage.prompt_tokens = len(request.prompt_token_ids)
                msg.usage.completion_tokens = n
            yield msg


def add_servicer(servicer: Any, server: Any) -> None:
    pbg.add_InferenceServicer_to_server(servicer, server)


class OwnServer(StandIn):
    """The replica serves gRPC itself, on its own thread and event loop."""

    def __init__(self, port: int) -> None:
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                server = grpc.aio.server()
                pbg.add_InferenceServicer_to_server(self, server)
                server.add_insecure_port(f"127.0.0.1:{port}")
                await server.start()
                ready.set()
                await server.wait_for_termination()

            asyncio.run(main())

        threading.Thread(target=run, daemon=True).start()
        ready.wait(30)


def clients(target: str, streams: int, messages: int) -> float:
    done = [0] * streams
    go = threading.Barrier(streams + 1)

    def one(i: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pbg.InferenceStub(ch)
            req = pb.GenerateRequest(prompt_token_ids=[5, 6], sampling={"max_tokens": messages})
            go.wait(60)
            for _ in stub.Generate(req, timeout=600):
                done[i] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    go.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    assert sum(done) == streams * messages, done
    return time.perf_counter() - t0


def cpu_by_process() -> dict[str, float]:
    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        label = next((k for k in ("ServeReplica", "ProxyActor", "bench.ingress") if k in cmd), None)
        if label and proc.info["cpu_times"] is not None:
            t = proc.info["cpu_times"]
            out[label] = out.get(label, 0.0) + t.user + t.system
    return out


def direct_port(pid_label: str = "ServeReplica") -> int:
    """The port Serve's direct ingress bound in the replica (its range starts at 40000)."""
    for proc in psutil.process_iter(["cmdline"]):
        if pid_label in " ".join(proc.info["cmdline"] or []):
            for c in proc.net_connections("tcp"):
                if c.status == "LISTEN" and 40000 <= c.laddr.port < 41000:
                    return c.laddr.port
    raise RuntimeError("no direct-ingress gRPC port found")


def one_way(way: str, streams: int, messages: int, step_ms: float) -> None:
    """Runs in a fresh process (Ray and Serve read their environment once)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.embedded import start_embedded_ray
    from cluster.net import free_port

    StandIn.step_s = step_ms / 1e3
    port = free_port()
    start_embedded_ray(include_dashboard=False)
    try:
        grpc_port = free_port() if way == "replica" else port
        serve.start(
            grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER]),
            http_options={"host": "127.0.0.1", "port": free_port()},
        )
        options = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1000}
        if way == "replica":
            app = serve.deployment(**options)(OwnServer).bind(port)
        else:
            app = serve.deployment(**options)(StandIn).bind()
        serve.run(app, name="ingress", route_prefix="/")
        target = f"127.0.0.1:{direct_port() if way == 'direct' else port}"
        clients(target, 2, 4)  # warm-up
        c0 = cpu_by_process()
        wall = clients(target, streams, messages)
        c1 = cpu_by_process()
        n = streams * messages
        use = {k: (c1[k] - c0.get(k, 0.0)) / n * 1e6 for k in c1}
        row = " | ".join(f"{use.get(k, 0.0):.0f}" for k in ("ServeReplica", "ProxyActor"))
        server_side = use.get("ServeReplica", 0.0) + use.get("ProxyActor", 0.0)
        print(
            f"| {way} | {streams} | {n / wall:.0f} | {row} | **{server_side:.0f}** | "
            f"{use.get('bench.ingress', 0.0):.0f} |",
            flush=True,
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ways", default="proxy,replica,direct")
    ap.add_argument("--streams", default="32")
    ap.add_argument("--messages", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        way, streams = args.one.split(":")
        one_way(way, int(streams), args.messages, args.step_ms)
        return
    print(
        "| way | streams | messages/s | replica µs/msg | proxy µs/msg | server side µs/msg "
        "| client µs/msg |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for way in args.ways.split(","):
        for streams in args.streams.split(","):
            env = dict(os.environ)
            if way == "direct":
                env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
            cmd = [sys.executable, "-m", "bench.ingress", "--one", f"{way}:{streams}"]
            cmd += ["--messages", str(args.messages), "--step-ms", str(args.step_ms)]
            subprocess.run(cmd, env=env, check=False, timeout=900)


if __name__ == "__main__":
    main()
