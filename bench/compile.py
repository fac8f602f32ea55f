"""torch.compile (inductor, CPU) as an engine lever, measured against eager with and without the
C++ kernels, on the decode steps of one batch.

    python -m bench.compile [--shape peer] [--arch qwen3_moe] [--new-tokens 64]
                            [--variants kernels,torch,torch+compile,kernels+compile]

64 prompts × 64 random tokens, greedy, ignore-eos, fp32, 2 threads. Variants: `kernels` (the
default engine), `torch` (MOE_KERNELS=0: the torch paths), `+compile`: every decoder layer
wrapped in `torch.compile(dynamic=False)` (one graph per token count; dynamo splits the layer
where it cannot trace: the paged-attention metadata, the per-expert grouping, the C++ kernels).
Reported: ms per decode step (median over the steps where all 64 sequences decode), the
warm-up time (compiles included), and whether the tokens equal the `kernels` variant's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.offline import checkpoint
from workers.engine import SamplingParams
from workers.engine.build import build_engine


def run(path: str, variant: str, prompts: list[list[int]], new: int) -> dict:
    os.environ["MOE_KERNELS"] = "0" if variant.startswith("torch") else "1"
    torch._dynamo.reset()
    engine = build_engine(path, progress=False)
    if variant.endswith("+compile"):
        for i, layer in enumerate(engine.model.model.layers):
            engine.model.model.layers[i] = torch.compile(layer, dynamic=False)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    engine.generate([(p, params) for p in prompts])  # warm-up: the same shapes, compiles
    warm = time.perf_counter() - start
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params, prompt_token_ids=p)
    steps: list[float] = []
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if len(engine.last_batch) == len(prompts) and all(n == 1 for *_, n in engine.last_batch):
            steps.append(dt)
        for o in outs:
            if o.finished:
                tokens[o.request_id] = list(o.token_ids)
    return {
        "step_ms": statistics.median(steps) * 1e3,
        "warm_s": warm,
        "tokens": [tokens[f"r{i}"] for i in range(len(prompts))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="peer", choices=["bench", "peer"])
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--variants", default="kernels,torch,torch+compile,kernels+compile")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = str(checkpoint(args.arch, args.shape))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (64, 64), generator=gen).tolist()
    results = {}
    for variant in args.variants.split(","):
        results[variant] = run(path, variant, prompts, args.new_tokens)
        r = results[variant]
        print(f"{variant}: {r['step_ms']:.1f} ms/step, warm-up {r['warm_s']:.1f} s", flush=True)
    ref = next(iter(results.values()))["tokens"]
    print(f"\n{args.arch} ({args.shape} shape), 64 sequences decoding, 2 threads, fp32")
    print("| variant | ms per decode step | warm-up s (compiles) | tokens equal the first |")
    print("|---|---:|---:|---|")
    for variant, r in results.items():
        same = "yes" if r["tokens"] == ref else "NO"
        print(f"| {variant} | {r['step_ms']:.1f} | {r['warm_s']:.1f} | {same} |")


if __name__ == "__main__":
    main()
