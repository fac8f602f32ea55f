"""One long prompt's prefill: our engine (time to its first token) vs one transformers forward.

    python -m bench.long_prefill [--arch deepseek_v3,qwen3_moe] [--tokens 3000] [--repeat 3]

The issue-12 peer shapes (`bench/offline.py --shape peer`, 4k context), fp32, this process's
torch threads; best of --repeat after a warm-up, same weights, same random prompt, our prefix
cache off.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.offline import checkpoint
from workers.engine import EngineConfig, SamplingParams
from workers.engine.build import build_engine


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="deepseek_v3,qwen3_moe")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    rows = []
    for arch in args.arch.split(","):
        path = checkpoint(arch, "peer")
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, 4000, (args.tokens,), generator=gen).tolist()
        # the cache off: each repeat computes the whole prompt again
        engine = build_engine(path, progress=False, config=EngineConfig(prefix_caching=False))
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        work = [(prompt, params)]
        ours = best(lambda e=engine, w=work: e.generate(w), args.repeat)
        del engine
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor([prompt])

        def forward(hf=hf, ids=ids):
            with torch.inference_mode():
                hf(ids, use_cache=False)

        theirs = best(forward, args.repeat)
        rows.append((arch, ours, theirs))
    print(f"\none {args.tokens}-token prompt, fp32, torch threads={torch.get_num_threads()}")
    print("| arch | ours prefill s | transformers forward s | speed-up |")
    print("|---|---:|---:|---:|")
    for arch, ours, theirs in rows:
        print(f"| {arch} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
