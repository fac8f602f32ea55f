"""Where a decode step's time goes, by module: forward hooks time attention, its projections,
the routed experts, the norms and the LM head over the decode steps of one batch.

    python -m bench.step_profile [--shape peer] [--arch qwen3_moe] [--new-tokens 64]

64 prompts × 64 random tokens, greedy, ignore-eos, fp32, 2 threads; ms per decode step (hooks
add a little to each module's time).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from bench.offline import checkpoint
from workers.engine import SamplingParams
from workers.engine.build import build_engine

GROUPS = {  # module name suffix -> group
    "self_attn": "attention (all)",
    "q_proj": "attention projections",
    "k_proj": "attention projections",
    "v_proj": "attention projections",
    "o_proj": "attention projections",
    "experts": "routed experts",
    "layernorm": "norms",
    "q_norm": "norms",
    "k_norm": "norms",
    "lm_head": "LM head",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="peer", choices=["bench", "peer"])
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = build_engine(str(checkpoint(args.arch, args.shape)), progress=False)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (64, 64), generator=gen).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine.generate([(p, params) for p in prompts[:8]])  # warm-up

    spent: collections.Counter[str] = collections.Counter()
    started: dict[str, float] = {}
    for name, module in engine.model.named_modules():
        group = next((g for suffix, g in GROUPS.items() if name.endswith(suffix)), None)
        if group is None:
            continue
        module.register_forward_pre_hook(
            lambda m, a, n=name: started.__setitem__(n, time.perf_counter())
        )
        module.register_forward_hook(
            lambda m, a, o, n=name, g=group: spent.update({g: time.perf_counter() - started[n]})
        )
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params, prompt_token_ids=p)
    engine.step()
    while any(n > 1 for _, _, n in engine.last_batch):  # 4,096 prompt tokens: two prefill steps
        engine.step()
    spent.clear()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    total = time.perf_counter() - start
    step_ms = 1e3 * total / steps
    print(f"{args.arch} ({args.shape}): {steps} decode steps, {step_ms:.1f} ms per step")
    for group, seconds in spent.most_common():
        print(f"  {group:24s} {1e3 * seconds / steps:7.2f} ms")


if __name__ == "__main__":
    main()
