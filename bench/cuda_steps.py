"""Where a decode step's time goes on a GPU: wall time per step, the model's forward alone
(synchronized), and a torch profile of a few steps (CPU ops by self time, CUDA kernels by
device time, the GPU's busy share of the wall time).

    python -m bench.cuda_steps [--arch qwen3_moe,deepseek_v3] [--dtype bfloat16,float32]
                               [--batch 1,64] [--steps 16] [--out FILE]

64-token random prompts, greedy, ignore-eos, the "bench" preset checkpoints (bench/offline.py).
Steps are timed after every sequence's prefill; the profile's tables are appended to the file --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.offline import checkpoint
from workers.engine import SamplingParams
from workers.engine.build import build_engine


def decode_steps(engine, batch: int, steps: int, tag: str) -> tuple[float, float]:
    """Adds `batch` requests, runs their prefill, then times `steps` decode steps: (ms per step,
    ms of it in the model's forward)."""
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i, p in enumerate(torch.randint(3, 500, (batch, 64), generator=gen).tolist()):
        engine.add_request(f"{tag}-{i}", params, prompt_token_ids=p)
    engine.step()
    while any(n > 1 for _, _, n in engine.last_batch):
        engine.step()
    forward = engine.model.forward
    spent = [0.0]

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def timed(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = forward(*a, **k)
        sync()
        spent[0] += time.perf_counter() - t0
        return out

    engine.model.forward = timed
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - start
    del engine.model.forward
    while engine.has_unfinished():
        engine.step()
    return 1e3 * wall / steps, 1e3 * spent[0] / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen3_moe,deepseek_v3")
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cuda", help="cpu: the same figures for the CPU engine")
    args = ap.parse_args()
    out = Path(args.out) if args.out else None
    for arch in args.arch.split(","):
        for dtype in args.dtype.split(","):
            engine = build_engine(checkpoint(arch), progress=False, device=args.device, dtype=dtype)
            engine.generate([([7, 8, 9, 10], SamplingParams(max_tokens=4))])  # warm-up
            for b in [int(x) for x in args.batch.split(",")]:
                step_ms, fwd_ms = decode_steps(engine, b, args.steps, f"{dtype}-{b}")
                print(
                    f"{arch} {dtype} batch {b}: {step_ms:.2f} ms per decode step, "
                    f"forward {fwd_ms:.2f} ms (synchronized)",
                    flush=True,
                )
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    decode_steps(engine, b, 4, f"prof-{dtype}-{b}")
                ka = prof.key_averages()
                cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
                dev = ka.table(sort_by="self_device_time_total", row_limit=15)
                busy = sum(e.self_device_time_total for e in ka) / 1e3
                print(f"  profiled: GPU busy {busy:.1f} ms in all; top CPU ops:")
                for line in cpu.splitlines()[3:13]:
                    print("   ", line[:150])
                if out is not None:
                    with out.open("a") as f:
                        f.write(f"\n## {arch} {dtype} batch {b}\n{cpu}\n\n{dev}\n")
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
