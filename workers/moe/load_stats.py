"""Per-rank expert load: how many (token, expert) picks each logical expert got, over the last
`window` steps. The input to EPLB (`workers.moe.eplb.rebalance_experts`).

Legend: L MoE layers, E logical experts, W window (steps), T tokens, K experts per token.
"""

from __future__ import annotations

import torch

__all__ = ["ExpertLoad"]


class ExpertLoad:
    """A ring of W per-step [L, E] count tables. Call `record` for each MoE layer during a step,
    then `step` once when the step ends; `totals` sums the last W steps (the current one
    included). Counts stay on `device` and recording never syncs it with the host.

    The ended steps of the window are kept summed (`step` adds the step that ends and takes
    out the one that leaves), so `totals` is one [L, E] add: a sum over the ring was a parallel
    reduction, which on CPU left an idle rank's OpenMP workers spinning after each status."""

    def __init__(
        self, num_layers: int, num_experts: int, window: int, device: torch.device | str = "cpu"
    ) -> None:
        if num_layers < 1 or num_experts < 1 or window < 1:
            raise ValueError(
                f"num_layers, num_experts and window must be >= 1, got "
                f"{num_layers}, {num_experts}, {window}"
            )
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window = window
        self.counts = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=device)
        self.ended = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.current = 0  # ring position of the step being recorded
        self.num_steps = 0  # steps ended by `step` since construction or `reset`

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Adds one pick per entry of topk_ids [T, K] (logical ids in [0, E)) to `layer`.
        index_add_ rather than bincount: a fixed [E] output, so no host sync on CUDA."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        ids = topk_ids.reshape(-1).to(self.counts.device, torch.int64)
        self.counts[self.current, layer].index_add_(0, ids, torch.ones_like(ids))

    def step(self) -> None:
        """Ends the current step; the oldest step leaves the window to make room."""
        self.ended += self.counts[self.current]
        self.current = (self.current + 1) % self.window
        self.ended -= self.counts[self.current]  # the oldest step leaves (W = 1: the one ended)
        self.counts[self.current].zero_()
        self.num_steps += 1

    def totals(self) -> torch.Tensor:
        """[L, E] int64 picks per expert over the last W steps (the current one included)."""
        return self.ended + self.counts[self.current]

    def reset(self) -> None:
        self.counts.zero_()
        self.ended.zero_()
        self.current = 0
        self.num_steps = 0
