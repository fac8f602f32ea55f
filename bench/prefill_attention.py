"""The prefill attention kernel (`workers/kernels/prefill.cpp`) against torch's SDPA on the
long-prompt shapes of `bench.long_prefill`: a 2,048-token chunk from scratch, the 952 tokens
after it (over 3,000 positions), and DeepSeek's expanded MLA (keys of 96, values of 64, which
SDPA's CPU flash kernel only takes with the values padded to 96). Both through `_attend`'s inputs
(gathered K/V), this process's torch threads, best of 5; GFLOP/s over the causal pairs only.

    python -m bench.prefill_attention
"""

from __future__ import annotations

import time

import torch

from workers import kernels
from workers.models.attention import AttentionMetadata, _attend

BLOCK = 16
SHAPES = [  # name, cached, new, query heads, KV heads, key dim, value dim
    ("Qwen3 2,048 fresh", 0, 2048, 8, 4, 64, 64),
    ("Qwen3 952 after 2,048", 2048, 952, 8, 4, 64, 64),
    ("DeepSeek MLA expanded 2,048", 0, 2048, 8, 8, 96, 64),
]


def best(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    if kernels.kernel("prefill_attention") is None:
        raise SystemExit("the C++ kernels are not built: make install")
    print(f"torch threads {torch.get_num_threads()}")
    print("| shape | SDPA ms | kernel ms | SDPA GFLOP/s | kernel GFLOP/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name, cached, new, hq, hkv, dk, dv in SHAPES:
        ctx = cached + new
        meta = AttentionMetadata.build([cached], [new], [list(range(ctx // BLOCK + 1))], BLOCK)
        (part,) = meta.parts
        q = torch.randn(new, hq, dk, generator=gen)
        k = torch.randn(1, ctx, hkv, dk, generator=gen)
        v = torch.randn(1, ctx, hkv, dv, generator=gen)
        scale = dk**-0.5
        with torch.inference_mode():
            torch.testing.assert_close(
                kernels.prefill_attention(q, k, v, part, scale),
                _attend(q, k, v, part, scale),
                atol=1e-4,
                rtol=1e-4,
            )
            sdpa = best(lambda: _attend(q, k, v, part, scale))  # noqa: B023
            ours = best(lambda: kernels.prefill_attention(q, k, v, part, scale))  # noqa: B023
        pairs = sum(cached + i + 1 for i in range(new))
        flops = 2 * hq * pairs * (dk + dv)
        print(
            f"| {name} | {sdpa * 1e3:.1f} | {ours * 1e3:.1f} | {flops / sdpa / 1e9:.0f} "
            f"| {flops / ours / 1e9:.0f} | {sdpa / ours:.2f}x |"
        )


if __name__ == "__main__":
    main()
