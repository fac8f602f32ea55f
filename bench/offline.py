"""Offline throughput: our engine vs transformers `generate` (batched), same run, same weights.

    python bench/offline.py [--arch qwen3_moe,deepseek_v3] [--prompts 64] [--prompt-len 64]
                            [--new-tokens 128] [--threads N]
    python bench/offline.py --ep 1,2 [...]    # expert-parallel groups instead of transformers

Greedy, ignore-eos, fp32, on the "bench" preset checkpoints (written once under .cache/).
Prints tokens/s of each, the ratio, and how many generated tokens agree between the two.
With --ep, each EP size runs the same prompts (EP 1: this process, all cores; EP N: N Ray actors
with one torch thread each, gloo all-to-all); timing starts once every rank has loaded.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from cluster.tiny import make_tiny, param_count
from workers.engine import SamplingParams
from workers.engine.build import build_engine

CACHE = Path(".cache")


def checkpoint(arch: str) -> Path:
    out = CACHE / f"bench-{arch}"
    if not (out / "config.json").exists():
        make_tiny(arch, out, seed=0, preset="bench")
    return out


def run_ours(path: Path, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    engine = build_engine(path, progress=False)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate([(p, params) for p in prompts])
    elapsed = time.perf_counter() - start
    return elapsed, [o.token_ids for o in outs]


def run_transformers(path: Path, prompts: list[list[int]], new: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=None,
            eos_token_id=None,
        )
    elapsed = time.perf_counter() - start
    return elapsed, out[:, ids.shape[1] :].tolist()


def run_ep(path: Path, prompts: list[list[int]], new: int, ep: int):
    from cluster.ep_offline import ExpertParallelGroup
    from cluster.offline import PromptSpec

    if ep == 1:
        return run_ours(path, prompts, new)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    specs = [PromptSpec(f"p{i}", p, params) for i, p in enumerate(prompts)]
    with ExpertParallelGroup(path, ep) as group:
        group.ready()
        start = time.perf_counter()
        outs = group.generate(specs)
        elapsed = time.perf_counter() - start
    return elapsed, [o.token_ids for o in outs]


def main_ep(args) -> None:
    sizes = [int(e) for e in args.ep.split(",")]
    rows = []
    for arch in args.arch.split(","):
        path = checkpoint(arch)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 500, (args.prompts, args.prompt_len), generator=gen).tolist()
        total = args.prompts * args.new_tokens
        results = {ep: run_ep(path, prompts, args.new_tokens, ep) for ep in sizes}
        base_t, base_tokens = results[sizes[0]]
        for ep, (elapsed, tokens) in results.items():
            same = sum(
                a == b
                for x, y in zip(tokens, base_tokens, strict=True)
                for a, b in zip(x, y, strict=True)
            )
            rows.append((arch, ep, total / elapsed, base_t / elapsed, same, total))
    print(
        f"\n{args.prompts} prompts x {args.prompt_len} prompt tokens x {args.new_tokens} new "
        "tokens, greedy, fp32"
    )
    print(f"| arch | EP | tok/s | vs EP {sizes[0]} | tokens equal to EP {sizes[0]} |")
    print("|---|---|---|---|---|")
    for arch, ep, tps, ratio, same, total in rows:
        print(f"| {arch} | {ep} | {tps:.1f} | {ratio:.2f}x | {same}/{total} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe,deepseek_v3")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--ep", default="", help="comma-separated EP sizes, e.g. 1,2")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ep:
        main_ep(args)
        return
    rows = []
    for arch in args.arch.split(","):
        path = checkpoint(arch)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 500, (args.prompts, args.prompt_len), generator=gen).tolist()
        total = args.prompts * args.new_tokens
        t_ours, ours = run_ours(path, prompts, args.new_tokens)
        gc.collect()
        t_hf, theirs = run_transformers(path, prompts, args.new_tokens)
        gc.collect()
        same = sum(
            a == b for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True)
        )
        rows.append(
            (arch, param_count(arch, "bench") / 1e6, total / t_ours, total / t_hf, same, total)
        )
    print(
        f"\n{args.prompts} prompts x {args.prompt_len} prompt tokens x {args.new_tokens} new "
        f"tokens, greedy, fp32, torch threads={torch.get_num_threads()}"
    )
    print("| arch | params (M) | ours tok/s | transformers tok/s | ratio | tokens equal |")
    print("|---|---|---|---|---|---|")
    for arch, params, ours_tps, hf_tps, same, total in rows:
        print(
            f"| {arch} | {params:.0f} | {ours_tps:.1f} | {hf_tps:.1f} | "
            f"{ours_tps / hf_tps:.2f}x | {same}/{total} |"
        )


if __name__ == "__main__":
    main()
