"""Decode steps of the offline engine, timed around `engine.step`, with where the time outside
the model's forward goes (attention metadata, sampling), and the routed experts' kernel alone
on one step's real routing (the 6 layers' calls cycled: cold weights).

    python -m bench.decode_steps [--shape peer] [--arch qwen3_moe]
    MOE_KERNELS_BUILD=<hash> python -m bench.decode_steps   # an older kernel build, to alternate

64 prompts × 64 random tokens, 64 new, greedy, fp32, 2 threads.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from bench.offline import checkpoint
from workers import kernels
from workers.engine import SamplingParams
from workers.engine import engine as engine_module
from workers.engine.build import build_engine
from workers.models.attention import AttentionMetadata


def _timed(spent: collections.Counter, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="peer", choices=["bench", "peer"])
    ap.add_argument("--arch", default="qwen3_moe")
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = build_engine(str(checkpoint(args.arch, args.shape)), progress=False)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (64, 64), generator=gen).tolist()
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    engine.generate([(p, params) for p in prompts[:8]])  # warm-up
    spent: collections.Counter[str] = collections.Counter()
    engine.model.forward = _timed(spent, "model forward", engine.model.forward)
    engine_module.sample = _timed(spent, "sampling", engine_module.sample)
    build = AttentionMetadata.build
    AttentionMetadata.build = staticmethod(_timed(spent, "attention metadata", build))  # type: ignore[method-assign]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params, prompt_token_ids=p)
    engine.step()
    while any(n > 1 for _, _, n in engine.last_batch):  # the prompts take several prefill steps
        engine.step()
    calls = []  # one decode step's expert calls, for the kernel alone below
    hooks = [
        m.register_forward_hook(lambda m, a, o: calls.append((m, a)))
        for n, m in engine.model.named_modules()
        if n.endswith("experts")
    ]
    engine.step()
    for h in hooks:
        h.remove()
    spent.clear()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    total = time.perf_counter() - start
    AttentionMetadata.build = build  # type: ignore[method-assign]
    print(f"{args.arch} ({args.shape}), kernels {kernels.build_dir().name}: {steps} decode steps")
    print(f"  step                  {1e3 * total / steps:7.2f} ms")
    for name, seconds in spent.most_common():
        print(f"  {name:21s} {1e3 * seconds / steps:7.2f} ms")
    with torch.inference_mode():
        for m, a in calls:  # warm
            m(*a)
        start = time.perf_counter()
        for _ in range(50):
            for m, a in calls:
                m(*a)
        per = (time.perf_counter() - start) / 50
    print(f"  routed experts alone  {1e3 * per:7.2f} ms per step ({len(calls)} layers, cycled)")


if __name__ == "__main__":
    main()
