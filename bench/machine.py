"""The machine figures the README's analysis rests on: read bandwidth, fp32 sgemm at large and at
expert-sized row counts, and decode-step time of our engine vs transformers on the bench model.

    python -m bench.machine [--arch qwen3_moe] [--steps 16]

(Not named kernels.py: a script run from bench/ would shadow the `kernels` package that
transformers and vLLM import.)
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.offline import checkpoint, hf_generate
from workers.engine import SamplingParams
from workers.engine.build import build_engine


def _timed(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def bandwidth_gbs() -> float:
    w = torch.randn(48, 768, 512)  # one bench layer's expert weights, 72 MB
    return w.numel() * 4 / _timed(w.sum, 20) / 1e9


def sgemm_gflops(rows: int, k: int = 512, n: int = 512) -> float:
    a, b = torch.randn(rows, k), torch.randn(k, n)
    return 2 * rows * k * n / _timed(lambda: a @ b, 200 if rows < 256 else 20) / 1e9


def decode_step_ms(arch: str, steps: int) -> tuple[float, float]:
    """(ours, transformers) mean decode-step time for 64 sequences of 64 prompt tokens."""
    from transformers import AutoModelForCausalLM

    path = checkpoint(arch)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (64, 64), generator=gen).tolist()
    engine = build_engine(path, progress=False)
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), params, prompt_token_ids=p)
    while engine.stats().num_waiting or any(
        s.num_computed < len(s.prompt_token_ids) for s in engine.scheduler.running
    ):
        engine.step()  # prefill (and the first token)
    start = time.perf_counter()
    n = 0
    while engine.has_unfinished():
        engine.step()
        n += 1
    ours = (time.perf_counter() - start) / n
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def run(new: int) -> float:
        start = time.perf_counter()
        hf_generate(model, ids, new)
        return time.perf_counter() - start

    theirs = (run(steps + 1) - run(1)) / steps
    return ours * 1e3, theirs * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="qwen3_moe")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    print(f"torch threads={torch.get_num_threads()}")
    print(f"read bandwidth: {bandwidth_gbs():.1f} GB/s")
    for rows in (11, 19, 64, 2048):
        print(f"sgemm [{rows} x 512] @ [512 x 512]: {sgemm_gflops(rows):.0f} GFLOP/s")
    ours, theirs = decode_step_ms(args.arch, args.steps)
    print(
        f"{args.arch} decode step, 64 sequences: ours {ours:.0f} ms, transformers {theirs:.0f} ms"
    )


if __name__ == "__main__":
    main()
