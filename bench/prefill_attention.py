"""The prefill attention kernel (`workers/kernels/prefill.cpp`) against torch's SDPA on the
long-prompt shapes of `bench.long_prefill`: a 2,048-token chunk from scratch, the 952 tokens
after it (over 3,000 positions), DeepSeek's expanded MLA (keys of 96, values of 64, which
SDPA's CPU flash kernel only takes with the values padded to 96), and short prompts batched
(GQA, and MLA's absorbed form over the 576-float latent rows, as in a step with decodes). Both
through `_attend`'s inputs (gathered K/V), this process's torch threads, best of 5; GFLOP/s
over the causal pairs only.

    python -m bench.prefill_attention
"""

from __future__ import annotations

import torch

from bench.long_prefill import best
from workers import kernels
from workers.models.attention import AttentionMetadata, _attend

BLOCK = 16
SHAPES = [  # name, sequences, cached, new, query heads, KV heads, key dim, value dim
    ("Qwen3 2,048 fresh", 1, 0, 2048, 8, 4, 64, 64),
    ("Qwen3 952 after 2,048", 1, 2048, 952, 8, 4, 64, 64),
    ("DeepSeek MLA expanded 2,048", 1, 0, 2048, 8, 8, 96, 64),
    ("Qwen3 16 prompts of 64", 16, 0, 64, 8, 4, 64, 64),
    ("MLA absorbed, 8 prompts of 64 (a step with decodes)", 8, 0, 64, 16, 1, 576, 512),
]


def main() -> None:
    if kernels.kernel("prefill_attention") is None:
        raise SystemExit("the C++ kernels are not built: make install")
    print(f"torch threads {torch.get_num_threads()}")
    print("| shape | SDPA ms | kernel ms | SDPA GFLOP/s | kernel GFLOP/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name, b, cached, new, hq, hkv, dk, dv in SHAPES:
        ctx = cached + new
        blocks = ctx // BLOCK + 1
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(b)]
        meta = AttentionMetadata.build([cached] * b, [new] * b, tables, BLOCK)
        (part,) = meta.parts
        q = torch.randn(b * new, hq, dk, generator=gen)
        k = torch.randn(b, ctx, hkv, dk, generator=gen)
        v = torch.randn(b, ctx, hkv, dv, generator=gen)
        scale = dk**-0.5
        with torch.inference_mode():
            torch.testing.assert_close(
                kernels.prefill_attention(q, k, v, part, scale),
                _attend(q, k, v, part, scale),
                atol=1e-4,
                rtol=1e-4,
            )
            sdpa = best(lambda: _attend(q, k, v, part, scale), 5)  # noqa: B023
            ours = best(lambda: kernels.prefill_attention(q, k, v, part, scale), 5)  # noqa: B023
        pairs = b * sum(cached + i + 1 for i in range(new))
        flops = 2 * hq * pairs * (dk + dv)
        print(
            f"| {name} | {sdpa * 1e3:.1f} | {ours * 1e3:.1f} | {flops / sdpa / 1e9:.0f} "
            f"| {flops / ours / 1e9:.0f} | {sdpa / ours:.2f}x |"
        )


if __name__ == "__main__":
    main()
