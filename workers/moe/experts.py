"""The routed experts one rank owns, computed as a grouped SwiGLU FFN.

Legend: T tokens, H hidden, I expert intermediate size, E routed experts (global), El experts
owned here, K experts per token, N (token, owned expert) pairs.
Weights are stacked per owned expert: w13 [El, 2I, H] (gate rows, then up rows), w2 [El, H, I].
Checkpoints store them per expert (`{prefix}.{e}.gate_proj.weight` ...); see `checkpoint_names`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RoutedExperts"]


class RoutedExperts(nn.Module):
    def __init__(
        self, num_experts: int, owned: Sequence[int], hidden: int, intermediate: int
    ) -> None:
        super().__init__()
        owned = sorted(set(owned))
        if owned and not (owned[0] >= 0 and owned[-1] < num_experts):
            raise ValueError(f"owned experts must lie in [0, {num_experts}), got {owned}")
        self.num_experts = num_experts
        self.owned: list[int] = owned
        self.hidden = hidden
        self.intermediate = intermediate
        self.w13 = nn.Parameter(torch.empty(len(owned), 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(len(owned), hidden, intermediate))
        expert_map = torch.full((num_experts,), -1, dtype=torch.int64)
        expert_map[owned] = torch.arange(len(owned))
        self.expert_map: torch.Tensor  # [E] global id -> local index, -1 if owned elsewhere
        self.register_buffer("expert_map", expert_map, persistent=False)

    def checkpoint_names(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Per-expert checkpoint tensor names (and shapes) this rank needs."""
        h, i = self.hidden, self.intermediate
        names: dict[str, tuple[int, ...]] = {}
        for e in self.owned:
            names[f"{prefix}.{e}.gate_proj.weight"] = (i, h)
            names[f"{prefix}.{e}.up_proj.weight"] = (i, h)
            names[f"{prefix}.{e}.down_proj.weight"] = (h, i)
        return names

    @torch.no_grad()
    def load(self, prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
        i = self.intermediate
        for local, e in enumerate(self.owned):
            self.w13[local, :i].copy_(tensors[f"{prefix}.{e}.gate_proj.weight"])
            self.w13[local, i:].copy_(tensors[f"{prefix}.{e}.up_proj.weight"])
            self.w2[local].copy_(tensors[f"{prefix}.{e}.down_proj.weight"])

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H], topk_ids [T, K] global ids, topk_weights [T, K] -> [T, H]: the weighted sum
        over this rank's experts only (experts owned elsewhere contribute nothing here)."""
        t, k = topk_ids.shape
        out = torch.zeros_like(x)
        if t == 0 or not self.owned:
            return out
        local = self.expert_map[topk_ids].flatten()  # [T*K]
        pairs = torch.nonzero(local >= 0).squeeze(1)  # [N] flat (token, k) positions
        order = pairs[torch.argsort(local[pairs], stable=True)]  # [N] grouped by expert
        counts = torch.bincount(local[order], minlength=len(self.owned)).tolist()
        tokens = order // k  # [N]
        xs = x[tokens]  # [N, H]
        ys = torch.empty_like(xs)
        i = self.intermediate
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = F.linear(xs[start : start + n], self.w13[e])  # [n, 2I]
            h = F.silu(h[:, :i]) * h[:, i:]
            ys[start : start + n] = F.linear(h, self.w2[e])
            start += n
        ys = ys * topk_weights.flatten()[order, None].to(ys.dtype)
        return out.index_add_(0, tokens, ys)
