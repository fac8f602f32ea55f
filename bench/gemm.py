"""The few-row kernels against ATen on cold weights: GFLOP/s by rows, one or more threads.

    python -m bench.gemm [--rows 1,2,4,8,16,32,64] [--threads 1,2]

- linear: `kernels.linear`'s product (gemm.h `packed_gemm` over W packed in 16-output panels,
  (row block, panel) items over the threads), called directly (the row threshold of
  `kernels.linear` bypassed) vs `F.linear`, 512 -> 512 and 512 -> 4,096 (the LM head's shape),
  48 weights cycled so none stays cached.
- experts: `routed_ffn` with every one of 48 experts (H 512, I 256) given the same number of
  rows, reading w13/w2 as they are (`nt_gemm`) vs packed in 16-output panels
  (`packed_gemm`), vs ATen's `mm` per expert (what the torch path runs).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from workers import kernels

COPIES = 48


def _per_call(fn, calls: int) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - start) / calls


def linear_rows(rows: int, n: int, calls: int) -> tuple[float, float]:
    """GFLOP/s of ours and of F.linear for [rows, 512] @ [n, 512]^T."""
    lin = kernels.kernel("linear")
    ws = [torch.randn(n, 512) for _ in range(COPIES)]
    packed = [kernels.pack_panels(w) for w in ws]
    x = torch.randn(rows, 512)
    flop = 2 * rows * n * 512
    ours = _per_call(lambda i: lin(x, packed[i % COPIES], n, None), calls)
    aten = _per_call(lambda i: F.linear(x, ws[i % COPIES]), calls)
    return flop / ours / 1e9, flop / aten / 1e9


def expert_rows(rows: int, calls: int) -> tuple[float, float, float]:
    """GFLOP/s of routed_ffn unpacked, packed, and of ATen mm per expert, `rows` per expert."""
    h, i, e = 512, 256, COPIES
    ffn = kernels.kernel("routed_ffn")
    w13, w2 = torch.randn(e, 2 * i, h) * 0.05, torch.randn(e, h, i) * 0.05
    packed = (kernels.pack_panels(w13), kernels.pack_panels(w2))
    x = torch.randn(rows, h)
    tokens = torch.arange(rows).repeat(e)  # every expert gets all `rows` tokens
    weights = torch.rand(rows * e)
    counts = torch.full((e,), rows, dtype=torch.int64)
    flop = 2 * rows * e * 3 * h * i

    def aten(_):
        for k in range(e):
            g = x @ w13[k].t()
            torch.mm(F.silu(g[:, :i]) * g[:, i:], w2[k].t())

    plain = _per_call(lambda _: ffn(x, tokens, weights, counts, w13, w2, None, None), calls)
    pack = _per_call(lambda _: ffn(x, tokens, weights, counts, w13, w2, *packed), calls)
    return flop / plain / 1e9, flop / pack / 1e9, flop / _per_call(aten, calls) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calls", type=int, default=60)
    args = ap.parse_args()
    if kernels.kernel("linear") is None:
        raise SystemExit("the C++ kernels are not built: make kernels")
    print(f"GFLOP/s, cold weights ({COPIES} copies cycled), isa {kernels.kernel('isa')()}\n")
    print(
        "| threads | rows | linear 512→512 ours / ATen | linear 512→4096 ours / ATen "
        "| experts Linear layout / packed / ATen mm |"
    )
    print("|---:|---:|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in (int(r) for r in args.rows.split(",")):
            a = linear_rows(rows, 512, args.calls * 4)
            b = linear_rows(rows, 4096, args.calls)
            c = expert_rows(rows, max(args.calls // 6, 4))
            print(
                f"| {threads} | {rows} | {a[0]:.1f} / {a[1]:.1f} | {b[0]:.1f} / {b[1]:.1f} "
                f"| {c[0]:.1f} / {c[1]:.1f} / {c[2]:.1f} |"
            )


if __name__ == "__main__":
    main()
