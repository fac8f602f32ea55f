"""The paged decode attention kernel on cold caches: GQA (Qwen3 peer shape: 8 query heads over
4 KV heads of 64) and MLA (16 heads over one 576-float latent row), 64 sequences × 161
positions, three caches cycled so none stays in the CPU's caches; checked against the torch path.

    python -m bench.decode_attention
    MOE_KERNELS_BUILD=<hash> python -m bench.decode_attention   # an older build, to alternate
"""

from __future__ import annotations

import statistics
import time

import torch

from workers import kernels
from workers.models.attention import AttentionMetadata, KVLayout, paged_attention

B, BLOCK, CTX, COPIES = 64, 16, 160, 3


def run(name: str, row: tuple[int, ...], hq: int, dk: int, layout: KVLayout, kv) -> None:
    blocks = (CTX + BLOCK) // BLOCK + 1
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(B)]
    meta = AttentionMetadata.build([CTX] * B, [1] * B, tables, BLOCK)
    caches = [torch.randn(B * blocks * BLOCK, *row) for _ in range(COPIES)]
    q = torch.randn(B, hq, dk)
    got = paged_attention(q, caches[0], meta, kv, 0.1, layout)
    torch.testing.assert_close(
        got, paged_attention(q, caches[0], meta, kv, 0.1), atol=1e-4, rtol=1e-4
    )
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            for cache in caches:
                paged_attention(q, cache, meta, kv, 0.1, layout)
        rounds.append((time.perf_counter() - start) / (10 * COPIES))
    print(
        f"{name}: {1e6 * statistics.median(rounds):.0f} us per call (min {1e6 * min(rounds):.0f})"
    )


def main() -> None:
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)  # the kernel runs without autograd only
    print(f"kernels {kernels.build_dir().name}")
    hkv, d = 4, 64
    gqa = KVLayout(hkv, 0, d, hkv * d, d, d)
    run("GQA", (2, hkv, d), 8, d, gqa, lambda c: (c[:, :, 0], c[:, :, 1]))
    c, r = 512, 64
    mla = KVLayout(1, 0, 0, 0, 0, c)
    run("MLA", (c + r,), 16, c + r, mla, lambda x: (x[:, :, None, :], x[:, :, None, :c]))


if __name__ == "__main__":
    main()
