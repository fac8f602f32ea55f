"""The routed experts one rank owns, computed as a grouped SwiGLU FFN.

Legend: T tokens, H hidden, I expert intermediate size, E routed experts (global), El experts
owned here, K experts per token, N (token, owned expert) pairs.
Weights are stacked per owned expert: w13 [El, 2I, H] (gate rows, then up rows), w2 [El, H, I].
Checkpoints store them per expert (`{prefix}.{e}.gate_proj.weight` ...); see `checkpoint_names`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers import kernels
from workers.moe.load_stats import ExpertLoad
from workers.moe.placement import Placement, route_to_slots

__all__ = ["RoutedExperts"]


# torch._grouped_mm exists here and MOE_GROUPED_MM=0 does not turn it off (read once)
_GROUPED_MM = hasattr(torch, "_grouped_mm") and os.environ.get("MOE_GROUPED_MM", "1") != "0"


def _use_padded(counts: list[int]) -> bool:
    """counts [El] rows per owned expert. Few rows each (decode): one padded bmm over all owned
    experts beats a loop of tiny matmuls, but it streams every expert's weights, so only when
    most of them are busy. Measured crossover on CPU fp32: about 48 rows per expert."""
    return max(counts) <= 48 and 3 * sum(n > 0 for n in counts) >= 2 * len(counts)


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
        self.dispatcher: Any = None  # see forward; set for the whole model by set_dispatcher
        self.placement: Placement | None = None  # set by reshard: routing ids become slots
        self.slot_to_logical: list[int] = list(range(num_experts))  # whose weights an id holds
        self.layer_index = 0  # this MoE layer's position among the model's MoE layers
        self.expert_load: ExpertLoad | None = None  # model-wide; see CausalLM.track_expert_load
        self.use_kernel = True  # the fused C++ kernel when built (else the torch paths below)
        # torch._grouped_mm over all owned experts (one launch per projection, no host sync);
        # None: on CUDA in bf16 where torch has it; MOE_GROUPED_MM=0 turns that off
        self.use_grouped_mm: bool | None = None if _GROUPED_MM else False
        # w13/w2 in the kernel's packed-panel layout, made on the kernel's first fp32 CPU call
        # and again whenever the weights change (load, rebalance): a second copy of the expert
        # weights, for ~1.3-1.5x on the few-row products of decode steps (workers/kernels).
        self._packed = kernels.Panels()

    @property
    def num_logical(self) -> int:
        """Logical experts the router picks from (before redundant slots)."""
        return self.num_experts if self.placement is None else self.placement.num_logical

    def reshard(self, placement: Placement, rank: int) -> None:
        """Hold the physical slots `placement` gives `rank` (before loading weights): routing ids
        become slot ids, a redundant slot holds a copy of its logical expert, and tokens routed
        to a replicated expert are spread over its copies."""
        s, h, i = placement.slots_per_rank, self.hidden, self.intermediate
        self.set_slots(placement, rank, self.w13.new_empty(s, 2 * i, h), self.w2.new_empty(s, h, i))

    def set_slots(
        self, placement: Placement, rank: int, w13: torch.Tensor, w2: torch.Tensor
    ) -> None:
        """Hold `rank`'s slots of `placement` with weights w13 [S, 2I, H], w2 [S, H, I] (slot
        order). Replaces the Parameters (never resizes them in place) and every routing field
        together, so a forward sees either the old slots or the new ones. Local: the other
        ranks must switch to the same placement before the next dispatch."""
        slots = placement.slots_of_rank(rank)
        h, i, s = self.hidden, self.intermediate, len(slots)
        if tuple(w13.shape) != (s, 2 * i, h) or tuple(w2.shape) != (s, h, i):
            raise ValueError(
                f"rank {rank} holds {s} slots: need w13 [{s}, {2 * i}, {h}] and w2 [{s}, {h}, {i}],"
                f" got {list(w13.shape)} and {list(w2.shape)}"
            )
        expert_map = torch.full((placement.num_slots,), -1, dtype=torch.int64)
        expert_map[slots] = torch.arange(s)
        grad = self.w13.requires_grad
        self.w13 = nn.Parameter(w13, requires_grad=grad)
        self.w2 = nn.Parameter(w2, requires_grad=grad)
        self.expert_map = expert_map.to(w13.device)
        self.num_experts, self.owned = placement.num_slots, slots
        self.slot_to_logical = list(placement.slot_to_logical)
        self.placement = placement

    def checkpoint_names(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Per-expert checkpoint tensor names (and shapes) this rank needs."""
        h, i = self.hidden, self.intermediate
        names: dict[str, tuple[int, ...]] = {}
        for e in (self.slot_to_logical[s] for s in self.owned):
            names[f"{prefix}.{e}.gate_proj.weight"] = (i, h)
            names[f"{prefix}.{e}.up_proj.weight"] = (i, h)
            names[f"{prefix}.{e}.down_proj.weight"] = (h, i)
        return names

    @torch.no_grad()
    def load(self, prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
        i = self.intermediate
        for local, e in enumerate(self.slot_to_logical[s] for s in self.owned):
            self.w13[local, :i].copy_(tensors[f"{prefix}.{e}.gate_proj.weight"])
            self.w13[local, i:].copy_(tensors[f"{prefix}.{e}.up_proj.weight"])
            self.w2[local].copy_(tensors[f"{prefix}.{e}.down_proj.weight"])

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        overlap: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T, H], topk_ids [T, K], topk_weights [T, K] -> [T, H]: the MoE output of this
        rank's tokens. Without a dispatcher this rank must own every expert it is routed to.
        With one (expert parallelism) each token travels once to every rank owning one of its
        experts, each rank computes its experts' share, and the shares are summed back here.
        `overlap` (the shared experts) runs while the combine all-to-all is in flight and its
        [T, H] result is added last. Collective: every rank of the group calls this for every
        MoE layer, in the same order, every step, even with T = 0."""
        if self.expert_load is not None:  # logical ids of this rank's own tokens, before routing
            self.expert_load.record(self.layer_index, topk_ids)
        if self.placement is not None:  # logical expert ids -> the slots holding them
            topk_ids = route_to_slots(topk_ids, self.placement)
        if self.dispatcher is None:
            out = self.compute(x, topk_ids, topk_weights)
            return out if overlap is None else out + overlap()
        d = self.dispatcher.dispatch(x, topk_ids, topk_weights, layer=self.layer_index)
        y = self.compute(d.recv_x, d.recv_topk_ids, d.recv_topk_weights)  # [R, H]
        return self.dispatcher.combine(y, d.handle, overlap)

    def compute(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H], topk_ids [T, K] global ids, topk_weights [T, K] -> [T, H]: the weighted sum
        over this rank's experts only (experts owned elsewhere contribute nothing here)."""
        t, k = topk_ids.shape
        el = len(self.owned)
        if t == 0 or el == 0:
            return torch.zeros_like(x)
        if self._grouped_mm_on(x):
            return self._grouped(x, topk_ids, topk_weights)
        if self.use_kernel:  # C++: pairs grouped, then experts across threads (workers/kernels)
            grouped = kernels.group_pairs(topk_ids, topk_weights, self.expert_map, el)
            if grouped is not None:
                tokens, w, counts_t = grouped  # [N], [N], [El]
                out = kernels.routed_ffn(x, tokens, w, counts_t, self.w13, self.w2, self._panels(x))
                if out is not None:
                    return out
        local = self.expert_map[topk_ids].flatten()  # [T*K] local expert, -1 if owned elsewhere
        local, order = torch.sort(local, stable=True)  # order: [T*K] flat (token, k) positions
        counts = torch.bincount(local + 1, minlength=el + 1).tolist()  # [1 + El]; [0]: not ours
        local, order, counts = local[counts[0] :], order[counts[0] :], counts[1:]  # [N], [N], [El]
        cap = max(counts)
        if cap == 0:
            return torch.zeros_like(x)
        tokens = order // k  # [N], grouped by expert
        w = topk_weights.flatten().index_select(0, order).to(x.dtype)  # [N]
        if self.use_kernel:  # C++: experts across threads, no padding (workers/kernels)
            out = kernels.routed_ffn(x, tokens, w, counts, self.w13, self.w2, self._panels(x))
            if out is not None:
                return out
        if _use_padded(counts):
            return self._padded(x, local, tokens, w, counts, cap)
        return self._looped(x, tokens, w, counts)

    def _grouped_mm_on(self, x: torch.Tensor) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        return x.device.type == "cuda" and x.dtype == torch.bfloat16

    def _grouped(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Every owned expert in one grouped product per projection (torch._grouped_mm, rows
        grouped by expert), with no host sync: a pair routed to an expert owned elsewhere goes
        to local expert 0 with weight 0, so group sizes never leave the device."""
        el, k = len(self.owned), topk_ids.shape[1]
        local = self.expert_map[topk_ids].flatten()  # [T*K], -1: owned elsewhere
        w = topk_weights.flatten() * (local >= 0)  # [T*K]
        local, order = torch.sort(local.clamp(min=0), stable=True)  # [N = T*K]
        ends = torch.arange(1, el + 1, device=x.device, dtype=local.dtype)
        offs = torch.searchsorted(local, ends).to(torch.int32)  # [El] end row of each group
        tokens = order // k  # [N]
        w = w.index_select(0, order).to(x.dtype)  # [N]
        h = torch._grouped_mm(x.index_select(0, tokens), self.w13.transpose(1, 2), offs=offs)
        g = self._swiglu(h, w[:, None]).contiguous()  # [N, 2I] -> [N, I]
        y = torch._grouped_mm(g, self.w2.transpose(1, 2), offs=offs)  # [N, H]
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def _panels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weights packed for the kernel (kernels.Panels), current with w13/w2; None off
        the CPU or in other dtypes than fp32 (the kernel then reads w13/w2)."""
        w13, w2 = self.w13, self.w2
        if x.device.type != "cpu" or x.dtype != torch.float32 or w13.dtype != torch.float32:
            return None
        w13p, w2p = self._packed.of(w13, w2)
        return w13p, w2p

    def _swiglu(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h [..., 2I] (gate, up), w broadcastable to [..., 1] -> silu(gate) * up * w [..., I],
        computed in place in h's gate half (weighting before the down projection: I <= H)."""
        i = self.intermediate
        return F.silu(h[..., :i], inplace=True).mul_(h[..., i:]).mul_(w)

    def _looped(
        self, x: torch.Tensor, tokens: torch.Tensor, w: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """One expert at a time, gather -> FFN -> scatter, so temporaries stay cache-sized."""
        out = torch.zeros_like(x)  # [T, H]
        w13, w2 = self.w13.transpose(1, 2), self.w2.transpose(1, 2)  # [El, H, 2I], [El, I, H]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = tokens[start : start + n]  # [n]
            g = self._swiglu(torch.mm(x.index_select(0, tok), w13[e]), w[start : start + n, None])
            out.index_add_(0, tok, torch.mm(g, w2[e]))  # g [n, I] -> [n, H]
            start += n
        return out

    def _padded(
        self,
        x: torch.Tensor,
        local: torch.Tensor,
        tokens: torch.Tensor,
        w: torch.Tensor,
        counts: list[int],
        cap: int,
    ) -> torch.Tensor:
        """All owned experts as one batch of `cap` rows each. Spare slots read a zero row and
        carry weight 0; they scatter into a dump row T that is dropped."""
        (t, h), el = x.shape, len(self.owned)
        dev = x.device
        n = torch.tensor(counts, device=dev)  # [El]
        first = (n.cumsum(0) - n)[local]  # [N] first slot of each pair's expert
        rank = torch.arange(len(tokens), device=dev) - first  # [N] position in its expert
        slot = local * cap + rank  # [N] -> [El*cap]
        src = torch.full((el * cap,), t, dtype=torch.int64, device=dev).index_copy_(0, slot, tokens)
        ws = w.new_zeros(el * cap, 1).index_copy_(0, slot, w[:, None])  # [El*cap, 1]
        xs = torch.cat([x, x.new_zeros(1, h)]).index_select(0, src)  # [El*cap, H]
        hs = torch.bmm(xs.view(el, cap, h), self.w13.transpose(1, 2))  # [El, cap, 2I]
        g = self._swiglu(hs, ws.view(el, cap, 1))  # [El, cap, I]
        ys = torch.bmm(g, self.w2.transpose(1, 2)).view(el * cap, h)
        return x.new_zeros(t + 1, h).index_add_(0, src, ys)[:t]
