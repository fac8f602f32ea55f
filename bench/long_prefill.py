"""One long prompt's prefill: our engine (time to its first token) vs one transformers forward.

    python -m bench.long_prefill [--arch deepseek_v3,qwen3_moe] [--tokens 3000] [--repeat 3]

The issue-12 peer shapes (`bench/offline.py --shape peer`, 4k context), fp32, this process's
torch threads; best of --repeat after a warm-up, same weights, same random prompt, our prefix
cache off.

The floor: the prompt's matmul FLOPs (projections, routed + shared experts, causal attention's
QK^T and PV; counted from config.json, `prefill_flops`) at the best fp32 sgemm rate this process
reaches (`sgemm_rate`, large GEMMs on the same threads). No kernel can prefill faster than that
without changing the arithmetic, so `transformers / floor` is the most any fp32 engine can gain.
Below it, the hard ceiling: the same FLOPs at this CPU's fp32 multiply-add peak (`fma_peak`:
register-only chains on every thread, no memory traffic; needs the C++ kernels), and the rate a
2x speed-up over transformers would need.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.machine import sgemm_gflops
from bench.offline import checkpoint
from workers import kernels
from workers.engine import EngineConfig, SamplingParams
from workers.engine.build import build_engine
from workers.models.config import read_config


def prefill_flops(model_dir, tokens: int) -> float:
    """fp32 matmul FLOPs of one causal prefill of `tokens` tokens (logits of the last only)."""
    c = read_config(model_dir)
    h, n_heads = c.hidden_size, c.num_attention_heads
    if c.model_type == "deepseek_v3":  # MLA, expanded for prefill
        qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        q = h * c.q_lora_rank + c.q_lora_rank * n_heads * qk if c.q_lora_rank else h * n_heads * qk
        kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * n_heads * (
            c.qk_nope_head_dim + v
        )
        proj = q + kv + n_heads * v * h
        n_experts, shared = c.n_routed_experts, c.n_shared_experts or 0
        dense = c.first_k_dense_replace
    else:  # qwen3_moe, mixtral: grouped-query attention
        qk = v = getattr(c, "head_dim", None) or h // n_heads
        proj = h * n_heads * qk + 2 * h * c.num_key_value_heads * qk + n_heads * qk * h
        n_experts, shared, dense = c.num_local_experts, 0, 0
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    moe = (c.num_experts_per_tok + shared) * 3 * h * inter + h * n_experts
    mlp = dense * 3 * h * c.intermediate_size + (c.num_hidden_layers - dense) * moe
    per_token = c.num_hidden_layers * proj + mlp  # multiply-adds
    pairs = tokens * (tokens + 1) / 2  # causal (query, key) pairs
    attention = c.num_hidden_layers * n_heads * pairs * (qk + v)
    return 2 * (tokens * per_token + attention + h * c.vocab_size)


def sgemm_rate() -> float:
    """The best fp32 FLOP/s of large GEMMs (3000 rows, 512-2048 wide) on this process's threads."""
    return max(sgemm_gflops(3000, n, n) for n in (512, 1024, 2048)) * 1e9


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
        rows.append((arch, ours, theirs, prefill_flops(path, args.tokens)))
    rate, peak = sgemm_rate(), kernels.fma_peak()
    print(f"\none {args.tokens}-token prompt, fp32, torch threads={torch.get_num_threads()}")
    print(f"floor: the matmul FLOPs at this machine's best sgemm, {rate / 1e9:.0f} GFLOP/s")
    print(
        "| arch | ours prefill s | transformers forward s | speed-up | GFLOP | floor s | "
        "most possible speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arch, ours, theirs, flops in rows:
        floor = flops / rate
        print(
            f"| {arch} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x | {flops / 1e9:.1f} "
            f"| {floor:.2f} | {theirs / floor:.2f}x |"
        )
    if peak is None:
        print("(no FMA peak: the C++ kernels are not built)")
        return
    print(f"\nthis CPU's fp32 multiply-add peak on these threads: {peak:.0f} GFLOP/s")
    print("| arch | floor at the peak s | most possible speed-up | 2x transformers needs GFLOP/s |")
    print("|---|---:|---:|---:|")
    for arch, _, theirs, flops in rows:
        print(
            f"| {arch} | {flops / peak / 1e9:.2f} | {theirs * peak * 1e9 / flops:.2f}x "
            f"| {2 * flops / theirs / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
