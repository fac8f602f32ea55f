"""Where a burst's time to first token goes: the same burst of C prompts, twice, against one
deployment (1 prefill rank + 1 decode rank, 2 torch threads each, the serving benchmark's
prompts):

- "first token only": every stream is closed after its first token (the request is cancelled,
  so no decode runs while the burst is prefilled);
- "whole streams": every stream runs to --new-tokens (the first arrivals decode meanwhile).

Printed: the sorted first-token times (s from the burst's start) of each run.

    .venv/bin/python -m bench.burst            # --streams 32 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

import torch

from bench.serve import checkpoint, deployed, percentile
from cluster.config import ClusterConfig
from cluster.net import free_port
from router.client import AsyncInferenceClient


async def burst(target: str, prompts: list[list[int]], new: int, first_only: bool) -> list[float]:
    """Sorted first-token times of one burst; `first_only` closes each stream after it."""
    async with AsyncInferenceClient(target, timeout_s=600) as client:
        await client.model_info()
        start = time.perf_counter()
        firsts: list[float] = []

        async def one(p: list[int]) -> None:
            first = True
            stream = client.generate(
                prompt_token_ids=p, max_tokens=new, temperature=0.0, ignore_eos=True
            )
            async with contextlib.aclosing(stream):  # closing the stream cancels the request
                async for _ in stream:
                    if first:
                        firsts.append(time.perf_counter() - start)
                        first = False
                    if first_only:
                        return

        await asyncio.gather(*(one(p) for p in prompts))
        return sorted(firsts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    path = checkpoint("deepseek_v3", "bench")
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.streams, args.prompt_len), generator=g).tolist()
    port = free_port()
    stage = {"gang_size": 1, "torch_threads": 2}
    cfg = ClusterConfig.from_args(
        {"model": {"path": str(path)}, "prefill": stage, "decode": stage, "router": {"port": port}}
    )
    with deployed(cfg, timeout_s=600) as target:
        asyncio.run(burst(target, prompts[:1], 4, False))  # warm-up
        for name, first_only in [("first token only", True), ("whole streams", False)]:
            t = asyncio.run(burst(target, prompts, args.new_tokens, first_only))
            print(
                f"{name}: TTFT p50 {percentile(t, 50):.2f} s, first {t[0]:.2f} s, "
                f"last {t[-1]:.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
