"""Prefix caching on a shared-prefix workload, offline and served.

    .venv/bin/python -m bench.prefix        # --systems 4 --per-system 16 --system-tokens 1024
                                            # --unique 64 --new-tokens 64 [--skip-served]

The workload: --systems random "system prompts" of --system-tokens tokens, each followed by
--per-system requests with --unique random tokens of their own, in a seeded random order;
--new-tokens new tokens each, greedy, ignore-eos, fp32; every request is sent at once.
DeepSeek-V3 "bench" preset.

- offline (this process, 2 threads): the engine with the cache off and on; prefill tokens
  computed (tokens run through the model less the decode steps), time to first token p50/p99
  (every request added at once) and output tokens/s.
- served (the default shape: 1 prefill gang x 2 ranks, 1 decode gang x 2 ranks, gloo): cache
  off; on with `router.prefill_policy: least_loaded`; on with `cache_aware` (the default).
  Prefill tokens computed are the prefill ranks' `tokens_processed` (GetClusterStatus).
- no shared prefixes (offline): --plain prompts of system + unique random tokens each, cache
  off and on alternately, best of --repeat: the cost of hashing and bookkeeping alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from pathlib import Path

import torch

from bench.burst import burst
from bench.serve import checkpoint, deployed, offline_burst, percentile, run_streams
from cluster.config import ClusterConfig
from cluster.net import free_port
from router.client import InferenceClient
from workers.engine import EngineConfig, SamplingParams
from workers.engine.build import build_engine


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    systems = torch.randint(3, vocab, (args.systems, args.system_tokens), generator=g).tolist()
    n = args.systems * args.per_system
    tails = torch.randint(3, vocab, (n, args.unique), generator=g).tolist()
    order = torch.randperm(n, generator=g).tolist()  # arrivals mixed, not round-robin
    return [systems[i % args.systems] + tails[i] for i in order]


def offline(path: Path, prompts: list[list[int]], new: int, caching: bool) -> dict[str, float]:
    """All prompts added at once to a fresh engine (after a warm-up on an unrelated prompt)."""
    engine = build_engine(path, config=EngineConfig(prefix_caching=caching), progress=False)
    engine.generate([([5, 6, 7, 8], SamplingParams(max_tokens=2))])
    before = engine.stats().num_tokens_processed
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    ttft, elapsed = offline_burst(engine, prompts, params)
    computed = engine.stats().num_tokens_processed - before - len(prompts) * (new - 1)
    del engine
    gc.collect()
    return {
        "prefill": computed,
        "ttft_p50": percentile(ttft, 50) * 1e3,
        "ttft_p99": percentile(ttft, 99) * 1e3,
        "tok_s": len(prompts) * new / elapsed,
    }


def served(
    path: Path, prompts: list[list[int]], new: int, extra: dict, first_only: bool = False
) -> dict[str, float]:
    """The workload against a fresh deployment; `first_only`: each stream is closed after its
    first token (no decoding competes with the burst's prefill on this machine's 2 cores)."""
    port = free_port()
    router = {"port": port, "request_timeout_s": 3600, **extra.get("router", {})}
    cfg = ClusterConfig.from_args(
        {"model": {"path": str(path)}, "router": router}
        | {k: v for k, v in extra.items() if k != "router"}
    )
    with deployed(cfg) as target:
        run_streams(target, [[5, 6, 7, 8]], 2)  # warm-up
        with InferenceClient(target, timeout_s=60) as client:
            before = prefill_counters(client)
            if first_only:
                firsts = asyncio.run(burst(target, prompts, new, first_only=True))
                stats = {
                    "ttft_p50": percentile(firsts, 50) * 1e3,
                    "ttft_p99": percentile(firsts, 99) * 1e3,
                    "tok_s": float("nan"),
                }
            else:
                stats = run_streams(target, prompts, new)
            want = sum(q for q, _ in before.values()) + sum(len(p) for p in prompts)
            deadline = time.monotonic() + 30
            after = prefill_counters(client)
            while sum(q for q, _ in after.values()) < want and time.monotonic() < deadline:
                time.sleep(0.2)  # ranks report every 0.5 s; bounded by the deadline
                after = prefill_counters(client)
    stats["prefill"] = sum(c for _, c in after.values()) - sum(c for _, c in before.values())
    mean = sum(len(p) for p in prompts) / len(prompts)
    stats["requests_per_rank"] = sorted(round((after[k][0] - before[k][0]) / mean) for k in after)
    return stats


def prefill_counters(client: InferenceClient) -> dict[str, tuple[int, int]]:
    """Per prefill rank: (prompt tokens looked up, tokens run through the model)."""
    (dep,) = [d for d in client.cluster_status().deployments if d.name == "prefill"]
    return {
        r.replica_id: (r.prefix_query_tokens, r.tokens_processed)
        for g in dep.gangs
        for r in g.ranks
    }


def row(name: str, r: dict[str, float], off: dict[str, float]) -> str:
    saved = 1 - r["prefill"] / off["prefill"]
    speedup = off["ttft_p50"] / r["ttft_p50"]
    return (
        f"| {name} | {r['prefill']:,.0f} | {saved:.0%} | {r['ttft_p50']:,.0f} / "
        f"{r['ttft_p99']:,.0f} | {speedup:.1f}x | {r['tok_s']:.1f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--per-system", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--unique", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--plain", type=int, default=16, help="prompts of the no-sharing workload")
    ap.add_argument("--repeat", type=int, default=3, help="no-sharing runs per setting")
    ap.add_argument("--skip-served", action="store_true")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument(
        "--first-only", action="store_true", help="served: close each stream at its first token"
    )
    ap.add_argument(
        "--served-runs", default="off,least_loaded,cache_aware", help="which served runs"
    )
    args = ap.parse_args()
    path = checkpoint("deepseek_v3", "bench")
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    prompts = workload(args, vocab)
    new = args.new_tokens
    torch.set_num_threads(2)
    print(
        f"{len(prompts)} requests: {args.systems} system prompts x {args.system_tokens} tokens, "
        f"{args.unique} own tokens each, {new} new tokens; DeepSeek-V3 bench preset",
        flush=True,
    )
    header = (
        "| run | prefill tokens computed | saved | TTFT p50 / p99 ms | TTFT p50 gain | tok/s |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    if not args.skip_offline:
        off = offline(path, prompts, new, False)
        on = offline(path, prompts, new, True)
        print("\noffline engine (2 threads)\n" + header)
        print(row("cache off", off, off))
        print(row("cache on", on, off), flush=True)
    if not args.skip_served:
        every = {
            "off": ("cache off", {"prefix_caching": False}),
            "least_loaded": (
                "cache on, least_loaded routing",
                {"router": {"prefill_policy": "least_loaded"}},
            ),
            "cache_aware": ("cache on, cache_aware routing", {}),
        }
        runs = dict(every[k] for k in args.served_runs.split(","))
        results = {}
        for name, extra in runs.items():
            results[name] = served(path, prompts, new, extra, args.first_only)
            print(f"served, {name}: {results[name]}", flush=True)
        print("\nserved (default shape: prefill 1 gang x 2, decode 1 gang x 2)\n" + header)
        base = results.get("cache off") or next(iter(results.values()))
        for name, r in results.items():
            print(row(name, r, base) + f" requests per prefill rank {r['requests_per_rank']}")
    if args.plain:
        g = torch.Generator().manual_seed(1)
        n = args.system_tokens + args.unique
        plain = torch.randint(3, vocab, (args.plain, n), generator=g).tolist()
        best: dict[bool, float] = {False: 0.0, True: 0.0}
        for _ in range(args.repeat):
            for caching in (False, True):
                best[caching] = max(best[caching], offline(path, plain, new, caching)["tok_s"])
        print(
            f"\nno shared prefixes, offline ({args.plain} prompts x {n} tokens, best of "
            f"{args.repeat}): cache off {best[False]:.1f} tok/s, on {best[True]:.1f} tok/s "
            f"({best[True] / best[False]:.3f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
