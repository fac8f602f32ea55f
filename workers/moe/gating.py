"""Router gating as pure functions: router logits -> (topk_ids, topk_weights).

Legend: T tokens, E routed experts, K experts per token, G expert groups.
Scores are computed in fp32 like transformers; weights come back in fp32.
"""

from __future__ import annotations

import torch

from workers import kernels

__all__ = ["grouped_sigmoid_topk", "softmax_topk"]


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-MoE / Mixtral gating. logits [T, E] -> ids [T, K] int64, weights [T, K] fp32."""
    fused = kernels.softmax_topk(logits, top_k, renormalize)  # one C++ call for fp32 on the CPU
    if fused is not None:
        return fused
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def grouped_sigmoid_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 gating (noaux_tc).

    Sigmoid scores; `correction_bias` [E] shifts scores for *selection only*; experts are chosen
    only inside the `topk_groups` groups with the largest sum of their top-2 biased scores; the
    weights are the unbiased scores of the chosen experts, optionally renormalised, then scaled.
    logits [T, E] -> ids [T, K] int64, weights [T, K] fp32.
    """
    t, e = logits.shape
    scores = logits.float().sigmoid()  # [T, E]
    biased = scores + correction_bias.float()[None, :]  # [T, E]
    grouped = biased.view(t, num_groups, e // num_groups)  # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    group_ids = torch.topk(group_scores, topk_groups, dim=-1, sorted=False)[1]  # [T, topk_groups]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0).bool()  # [T, G]
    expert_mask = group_mask[:, :, None].expand(t, num_groups, e // num_groups).reshape(t, e)
    masked = biased.masked_fill(~expert_mask, float("-inf"))  # [T, E]
    ids = torch.topk(masked, top_k, dim=-1, sorted=False)[1]  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling
