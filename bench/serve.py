"""Serving benchmark: the cluster over gRPC (and/or the OpenAI HTTP API) vs the offline engine
on the same workload.

    python -m bench.serve [--arch deepseek_v3] [--preset bench] [--streams 1,8,32,128]
                          [--prompt-len 64] [--new-tokens 128] [--gang-size 2]
                          [--rank-threads 1] [--stream-interval 1] [--api grpc|openai|grpc,openai]

For each concurrency C, C gRPC streams start together (one request each, greedy, ignore-eos,
random prompts of --prompt-len tokens; asyncio clients in this process) against the cluster:
1 prefill gang and 1 decode gang of --gang-size ranks (gloo), deployed in this process's own
Ray. Reported per C: output tokens/s (all tokens / wall time from the first send to the last
token), time to first token and inter-token latency p50/p99 from the client's receive times,
and the CPU each process spent per streamed token (psutil).

The peer, before the cluster is up and again after it is down (its tok/s: the mean of the two,
both printed; this VM's speed drifts 10-20% within minutes, and the bracket weighs a drift on
both sides alike): the offline engine on the same C prompts as one batch, of the same
expert-parallel size (`offline --ep N`: N Ray actors, one thread each, when --gang-size is
N > 1; this process with --threads threads when it is 1), and the offline engine's own time to
first token (after the cluster; this process, every prompt added at once, stepped until each
has its first token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Iterator
from pathlib import Path

import ray
import torch

from cluster.config import ClusterConfig
from cluster.embedded import start_embedded_ray
from cluster.launch import deploy, undeploy
from cluster.net import free_port
from cluster.tiny import make_tiny
from router.client import AsyncInferenceClient
from workers.engine import SamplingParams
from workers.engine.build import build_engine

CACHE = Path(".cache")


def checkpoint(arch: str, preset: str) -> Path:
    out = CACHE / f"{preset}-{arch}"
    if not (out / "config.json").exists():
        make_tiny(arch, out, seed=0, preset=preset)
    return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


@contextlib.contextmanager
def deployed(cfg: ClusterConfig, timeout_s: float = 900) -> Iterator[str]:
    """The cluster of `cfg` in this process's own Ray; yields its gRPC target, then takes the
    application, Serve and Ray down. The OpenAI API is on `cfg.router.http_port`."""
    start_embedded_ray(include_dashboard=False)
    try:
        deploy(cfg, timeout_s=timeout_s)
        yield f"localhost:{cfg.router.port}"
    finally:
        undeploy()
        ray.shutdown()


def run_streams(
    target: str, prompts: list[list[int]], new: int, interval: int = 0
) -> dict[str, float]:
    """C concurrent streams, one request each; latencies from the client's receive times."""
    return asyncio.run(_streams(target, prompts, new, interval))


def _summary(tok_s: float, ttft: list[float], itl: list[float]) -> dict[str, float]:
    return {
        "tok_s": tok_s,
        "ttft_p50": percentile(ttft, 50) * 1e3,
        "ttft_p99": percentile(ttft, 99) * 1e3,
        "itl_p50": percentile(itl, 50) * 1e3,
        "itl_p99": percentile(itl, 99) * 1e3,
    }


def run_sse_streams(base_url: str, prompts: list[list[int]], new: int) -> dict[str, float]:
    """The same over the OpenAI API: C concurrent `POST /v1/completions` with `stream: true`
    (server-sent events, one token per event at the cluster's stream_interval 1)."""
    return asyncio.run(_sse_streams(base_url, prompts, new))


async def _sse_streams(base_url: str, prompts: list[list[int]], new: int):
    import httpx

    ttft: list[float] = []
    itl: list[float] = []
    tokens = [0] * len(prompts)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "prompt": prompts[i],
            "max_tokens": new,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = last = time.perf_counter()
        first = None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if not event["choices"]:  # the usage chunk
                    tokens[i] = event["usage"]["completion_tokens"]
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now - sent
                else:
                    itl.append(now - last)
                last = now
        ttft.append(first if first is not None else float("nan"))

    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=900, limits=limits) as client:
        (await client.get("/v1/models")).raise_for_status()  # connected before the clock starts
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
        elapsed = time.perf_counter() - start
    assert sum(tokens) == new * len(prompts), tokens
    return _summary(sum(tokens) / elapsed, ttft, itl)


async def _streams(target: str, prompts: list[list[int]], new: int, interval: int):
    ttft: list[float] = []
    itl: list[float] = []
    tokens = [0] * len(prompts)

    async def one(client: AsyncInferenceClient, i: int) -> None:
        sent = last = time.perf_counter()
        first = None
        async for chunk in client.generate(
            prompt_token_ids=prompts[i],
            max_tokens=new,
            temperature=0.0,
            ignore_eos=True,
            stream_interval=interval,
        ):
            now = time.perf_counter()
            if first is None:
                first = now - sent
            elif chunk.token_ids:
                itl.append((now - last) / len(chunk.token_ids))
            last = now
            tokens[i] += len(chunk.token_ids)
        ttft.append(first if first is not None else float("nan"))

    async with AsyncInferenceClient(target, timeout_s=900) as client:
        await client.model_info()  # the channel is connected before the clock starts
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
        elapsed = time.perf_counter() - start
    assert sum(tokens) == new * len(prompts), tokens
    return _summary(sum(tokens) / elapsed, ttft, itl)


LABELS = (
    "PrefillRank",
    "DecodeRank",
    "Router",
    "ProxyActor",
    "ServeController",
    "DashboardAgent",
    "raylet",
    "gcs_server",
    "bench.serve",
)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each process on this machine, keyed by a short label."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        label = next((k for k in LABELS if k in cmd), "other")
        t = proc.info["cpu_times"]
        if t is not None:
            out[label] = out.get(label, 0.0) + t.user + t.system
    return out


def offline_burst(
    engine, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[float], float]:
    """Every prompt added at once to the offline engine, stepped until all finish: each
    request's first-token time and the whole run's time (s)."""
    ids = [f"burst-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, params, prompt_token_ids=p)
    first: dict[str, float] = {}
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
    return [first[r] for r in ids], time.perf_counter() - start


def offline_engine(path: Path, device: str, dtype: str):
    """The offline engine of this run, warmed up (CUDA's first launches stay out of timings)."""
    engine = build_engine(path, progress=False, device=device, dtype=dtype)
    engine.generate([([5, 6, 7, 8], SamplingParams(max_tokens=2))])
    return engine


def offline_ttft(engine, prompts: list[list[int]]) -> tuple[float, float]:
    """The offline engine's time to first token (p50, p99 ms): every prompt added at once."""
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    times, _ = offline_burst(engine, prompts, params)
    return percentile(times, 50) * 1e3, percentile(times, 99) * 1e3


def run_offline(
    path: Path, prompts: list[list[int]], new: int, ep: int, device: str, dtype: str
) -> float:
    """Offline tok/s of the same prompts as one batch: this process (ep 1) or an EP group."""
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    if ep > 1:
        from cluster.ep_offline import ExpertParallelGroup
        from cluster.offline import PromptSpec

        specs = [PromptSpec(f"p{i}", p, params) for i, p in enumerate(prompts)]
        with ExpertParallelGroup(path, ep) as group:
            group.ready()
            group.generate(specs[:1])  # warm-up
            start = time.perf_counter()
            outs = group.generate(specs)
            elapsed = time.perf_counter() - start
    else:
        engine = offline_engine(path, device, dtype)
        start = time.perf_counter()
        outs = engine.generate([(p, params) for p in prompts])
        elapsed = time.perf_counter() - start
        del engine
        gc.collect()
        if torch.cuda.is_available():  # the cluster's ranks share this GPU next
            torch.cuda.empty_cache()
    assert all(len(o.token_ids) == new for o in outs)
    return new * len(prompts) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="deepseek_v3")
    ap.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--streams", default="1,8,32,128")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the offline engine")
    ap.add_argument("--gang-size", type=int, default=2, help="ranks per prefill and decode gang")
    ap.add_argument("--rank-threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--stream-interval", type=int, default=0, help="0: the cluster default (1)")
    ap.add_argument("--config", type=json.loads, default={}, help="JSON merged into the config")
    ap.add_argument(
        "--api",
        default="grpc",
        help="grpc, openai (HTTP/SSE /v1/completions) or both (grpc,openai: the same deployment, "
        "alternating per concurrency)",
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="cuda: both ranks share this machine's one GPU (num_gpus_per_rank 0.5; --gang-size "
        "1) and the offline engine runs on it too",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--idle-s", type=float, default=0, help="first, CPU %% per process of the idle cluster"
    )
    args = ap.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    apis = args.api.split(",")
    if not set(apis) <= {"grpc", "openai"} or (apis != ["grpc"] and args.stream_interval > 1):
        ap.error("--api: grpc, openai or grpc,openai; the OpenAI API streams at interval 1")
    on_gpu = args.device.startswith("cuda")
    if on_gpu and args.gang_size != 1:
        ap.error("--device cuda: use --gang-size 1 (the prefill and decode rank share one GPU)")
    path = checkpoint(args.arch, args.preset)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    g = torch.Generator().manual_seed(0)

    def fresh(c: int) -> list[list[int]]:
        """C new random prompts: no pass may hit the prefix cache another pass filled."""
        return torch.randint(3, vocab, (c, args.prompt_len), generator=g).tolist()

    warm = fresh(1)
    warm_sse = fresh(1) if "openai" in apis else []
    plan = [(c, api, fresh(c)) for c in levels for api in apis]
    workloads: dict[int, list[list[int]]] = {}  # the first API's prompts per C, for offline
    for c, _, prompts in plan:
        workloads.setdefault(c, prompts)
    ep = args.gang_size

    def offline_pass() -> dict[int, float]:
        return {
            c: run_offline(path, workloads[c], args.new_tokens, ep, args.device, args.dtype)
            for c in levels
        }

    # The offline peer runs before the cluster and again after it; its tok/s is the mean of the
    # two, so a drift of the machine's speed over the minute between them (this VM's moves by
    # 10-20% within minutes) weighs on both sides alike.
    torch.set_num_threads(args.threads)
    offline_before = offline_pass()

    port = free_port()
    stage = {"gang_size": args.gang_size, "torch_threads": args.rank_threads}
    if on_gpu:
        stage |= {"num_gpus_per_rank": 0.5, "num_cpus_per_rank": 1}
    base = {
        "model": {"path": str(path), "dtype": args.dtype},
        "prefill": dict(stage),
        "decode": dict(stage),
        "router": {"port": port, "http_port": free_port()},
    }
    for section, values in args.config.items():  # sections merge; top-level fields replace
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    cfg = ClusterConfig.from_args(base)
    served: dict[tuple[str, int], dict[str, float]] = {}
    cpu: dict[tuple[str, int], dict[str, float]] = {}
    http = f"http://127.0.0.1:{cfg.router.http_port}"
    with deployed(cfg) as target:
        run_streams(target, warm, 4)  # warm-up
        if args.idle_s:
            time.sleep(1)
            idle0 = cpu_seconds()
            time.sleep(args.idle_s)  # measuring the idle cluster's own CPU, on purpose
            idle1 = cpu_seconds()
            pct = {k: (idle1[k] - idle0.get(k, 0.0)) / args.idle_s * 100 for k in idle1}
            print(
                "idle cluster, % of one core: "
                + ", ".join(
                    f"{k} {v:.1f}"
                    for k, v in sorted(pct.items(), key=lambda kv: -kv[1])
                    if v >= 0.1
                )
                + f"; total {sum(pct.values()):.1f}",
                flush=True,
            )
        if "openai" in apis:
            run_sse_streams(http, warm_sse, 4)  # warm-up
        for c, api, prompts in plan:
            cpu0 = cpu_seconds()
            if api == "grpc":
                stats = run_streams(target, prompts, args.new_tokens, args.stream_interval)
            else:
                stats = run_sse_streams(http, prompts, args.new_tokens)
            cpu1 = cpu_seconds()
            n = c * args.new_tokens
            served[api, c] = stats
            cpu[api, c] = {k: (cpu1[k] - cpu0.get(k, 0.0)) / n * 1e6 for k in cpu1}
            print(f"cluster {api} {c:>3} streams: {stats}", flush=True)

    offline_after = offline_pass()
    print(
        f"\n{args.arch} ({args.preset} preset), prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens per stream, greedy {args.dtype} on {args.device}, "
        "stream_interval "
        f"{args.stream_interval or 1}; cluster: prefill 1 gang x {ep}, decode 1 gang x {ep} "
        f"({args.rank_threads} threads/rank); offline: --ep {ep}"
    )
    print(
        "| streams | API | cluster tok/s | offline tok/s (before / after) | ratio | vs gRPC | "
        "TTFT p50 / p99 ms | offline TTFT p50 / p99 ms | ITL p50 / p99 ms |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    engine = offline_engine(path, args.device, args.dtype)
    ttft_off = {c: offline_ttft(engine, workloads[c]) for c in levels}
    del engine
    gc.collect()
    for c in levels:
        off = (offline_before[c] + offline_after[c]) / 2
        ttft_o = f"{ttft_off[c][0]:.0f} / {ttft_off[c][1]:.0f}"
        for api in apis:
            s = served[api, c]
            ttft = f"{s['ttft_p50']:.0f} / {s['ttft_p99']:.0f}"
            itl = f"{s['itl_p50']:.1f} / {s['itl_p99']:.1f}"
            ratio = s["tok_s"] / off
            vs = f"{s['tok_s'] / served['grpc', c]['tok_s']:.2f}x" if "grpc" in apis else "-"
            print(
                f"| {c} | {api} | {s['tok_s']:.1f} | {off:.1f} ({offline_before[c]:.1f} / "
                f"{offline_after[c]:.1f}) | {ratio:.2f}x | {vs} | {ttft} | "
                f"{ttft_o} | {itl} |",
                flush=True,
            )
    keys = list(cpu)
    shown = [k for k in LABELS if any(cpu[key].get(k, 0.0) >= 1 for key in keys)] + ["other"]
    print("\nCPU µs per streamed token, by process (ProxyActor: Serve's HTTP proxy)")
    print("| streams | API | " + " | ".join(shown) + " | Router + ingress |")
    print("|---:|---|" + "---:|" * (len(shown) + 1))
    for api, c in sorted(keys, key=lambda k: (k[1], k[0])):
        row = " | ".join(f"{cpu[api, c].get(k, 0.0):.0f}" for k in shown)
        hop = cpu[api, c].get("Router", 0.0) + cpu[api, c].get("ProxyActor", 0.0)
        print(f"| {c} | {api} | {row} | **{hop:.0f}** |", flush=True)


if __name__ == "__main__":
    main()
