"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Legend: N rows to sample (one per sequence that completes its known tokens this step), V vocab.
Seeded rows draw from their own `torch.Generator`, so a request's tokens do not depend on what
else shares the batch; unseeded rows share one engine generator.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from workers.engine.params import SamplingParams

__all__ = ["sample"]


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on one row [V] -> probabilities [V]."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    generators: Seq[torch.Generator | None],
    default_generator: torch.Generator,
) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [N, V] fp32 -> one token per row, and per row the logprobs asked for (or None).

    Logprobs are of the model's raw distribution (before temperature/top-k/top-p)."""
    tokens = torch.argmax(logits, dim=-1).tolist()  # greedy rows keep these
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filter(logits[i], p)
        gen = generators[i] or default_generator
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    logprobs: list[dict[int, float] | None] = [None] * len(tokens)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)  # [n, V]
        for row, i in enumerate(want):
            top = params[i].logprobs or 0
            entry = {tokens[i]: float(lp[row, tokens[i]])}
            if top:
                vals, ids = torch.topk(lp[row], top)
                entry.update(zip(ids.tolist(), vals.tolist(), strict=True))
            logprobs[i] = entry
    return tokens, logprobs
