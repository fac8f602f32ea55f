"""Serving benchmark: the cluster over gRPC vs the offline engine on the same workload.

    python -m bench.serve [--arch deepseek_v3] [--preset bench] [--streams 1,8,32]
                          [--prompt-len 64] [--new-tokens 64] [--threads 2]

For each concurrency C, C gRPC streams start together (one request each, greedy, ignore-eos,
random prompts of --prompt-len tokens) against `moe-cluster serve`'s default shape (1 prefill gang
x 2 ranks, 1 decode gang x 2 ranks, gloo), deployed in this process's own Ray. Reported: output
tokens/s (all tokens / wall time from the first send to the last token), time to first token and
inter-token latency p50/p99 from the client's receive times. The offline engine then runs the
same C prompts as one batch in this process (--threads torch threads) after the cluster is down,
and the ratio is cluster / offline.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
from pathlib import Path

import ray
import torch

from cluster.config import ClusterConfig
from cluster.launch import deploy, undeploy
from cluster.net import free_port
from cluster.tiny import make_tiny
from router.client import InferenceClient
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


def run_streams(target: str, prompts: list[list[int]], new: int) -> dict[str, float]:
    """C concurrent streams, one request each; latencies from the client's receive times."""
    ttft: list[float] = []
    itl: list[float] = []
    tokens = [0] * len(prompts)
    errors: list[BaseException] = []
    go = threading.Barrier(len(prompts) + 1)
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            with InferenceClient(target, timeout_s=600) as client:
                go.wait(60)
                sent = last = time.perf_counter()
                gaps: list[float] = []
                first = None
                for chunk in client.generate(
                    prompt_token_ids=prompts[i], max_tokens=new, temperature=0.0, ignore_eos=True
                ):
                    now = time.perf_counter()
                    if first is None:
                        first = now - sent
                    else:
                        gaps.append((now - last) / max(1, len(chunk.token_ids)))
                    last = now
                    tokens[i] += len(chunk.token_ids)
                with lock:
                    ttft.append(first if first is not None else float("nan"))
                    itl.extend(gaps)
        except BaseException as e:  # reported after the run
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    go.wait(60)
    start = time.perf_counter()
    for t in threads:
        t.join(900)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed, first: {errors[0]!r}")
    assert sum(tokens) == new * len(prompts), tokens
    return {
        "tok_s": sum(tokens) / elapsed,
        "ttft_p50": percentile(ttft, 50) * 1e3,
        "ttft_p99": percentile(ttft, 99) * 1e3,
        "itl_p50": percentile(itl, 50) * 1e3,
        "itl_p99": percentile(itl, 99) * 1e3,
    }


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each process on this machine, keyed by a short label."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        label = next(
            (
                k
                for k in (
                    "PrefillRank",
                    "DecodeRank",
                    "Router",
                    "ProxyActor",
                    "ServeController",
                    "raylet",
                    "gcs_server",
                    "bench.serve",
                )
                if k in cmd
            ),
            "other",
        )
        t = proc.info["cpu_times"]
        if t is not None:
            out[label] = out.get(label, 0.0) + t.user + t.system
    return out


def run_offline(path: Path, prompts: list[list[int]], new: int) -> float:
    engine = build_engine(path, progress=False)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine.generate([(prompts[0], SamplingParams(max_tokens=2))])  # warm-up
    start = time.perf_counter()
    outs = engine.generate([(p, params) for p in prompts])
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new for o in outs)
    del engine
    gc.collect()
    return new * len(prompts) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="deepseek_v3")
    ap.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the offline engine")
    ap.add_argument("--gang-size", type=int, default=2, help="ranks per prefill and decode gang")
    ap.add_argument("--rank-threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    path = checkpoint(args.arch, args.preset)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    g = torch.Generator().manual_seed(0)
    workloads = {
        c: torch.randint(3, vocab, (c, args.prompt_len), generator=g).tolist() for c in levels
    }

    port = free_port()
    cfg = ClusterConfig.from_args(
        {
            "model": {"path": str(path)},
            "prefill": {"gang_size": args.gang_size, "torch_threads": args.rank_threads},
            "decode": {"gang_size": args.gang_size, "torch_threads": args.rank_threads},
            "router": {"port": port},
        }
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    served: dict[int, dict[str, float]] = {}
    try:
        deploy(cfg, http_port=free_port(), timeout_s=900)
        target = f"localhost:{port}"
        run_streams(target, workloads[levels[0]][:1], 4)  # warm-up
        for c in levels:
            cpu0 = cpu_seconds()
            served[c] = run_streams(target, workloads[c], args.new_tokens)
            cpu1 = cpu_seconds()
            use = {
                k: round(cpu1[k] - cpu0.get(k, 0.0), 1)
                for k in cpu1
                if cpu1[k] > cpu0.get(k, 0.0) + 0.05
            }
            print(
                f"cluster {c:>3} streams: {served[c]}\n  CPU seconds by process: {use}", flush=True
            )
    finally:
        undeploy()
        ray.shutdown()

    torch.set_num_threads(args.threads)
    print(
        f"\n{args.arch} ({args.preset} preset), prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens per stream, greedy fp32; cluster: prefill 1 gang x "
        f"{args.gang_size}, decode 1 gang x {args.gang_size} ({args.rank_threads} threads/rank)"
    )
    print(
        "| streams | cluster tok/s | offline tok/s | ratio | TTFT p50 / p99 ms | ITL p50 / p99 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        off = run_offline(path, workloads[c], args.new_tokens)
        s = served[c]
        ttft = f"{s['ttft_p50']:.0f} / {s['ttft_p99']:.0f}"
        itl = f"{s['itl_p50']:.1f} / {s['itl_p99']:.1f}"
        ratio = s["tok_s"] / off
        print(f"| {c} | {s['tok_s']:.1f} | {off:.1f} | {ratio:.2f}x | {ttft} | {itl} |", flush=True)


if __name__ == "__main__":
    main()
