"""Apply a new expert placement to a running expert-parallel group: move only the expert weights
that change ranks, then switch every rank's slots at once. Also: rebalance from observed load.

Legend: L MoE layers, E logical experts, N ranks, P physical slots, S slots per rank, H hidden,
I expert intermediate size, D = 2I*H + H*I values in one flattened slot row (w13, then w2),
n rows this rank sends or receives.

Collective hazards. `exchange_expert_weights`, `apply_placements` and `rebalance_from_load` are
collectives on the dispatch group. Every rank must call them at the same step boundary (between
two forwards: inside one, a pending dispatch would meet weight rows), for the same layers, in
the same order, with the same placements. Placements are plain data and the planning here is
pure and deterministic, so ranks holding the same placements (and, for `rebalance_from_load`,
the same all-reduced load) agree on every split size without a counts exchange. A layer's
switch is local to each rank; the dispatcher needs no new tables as long as P and N stay fixed
(slot s lives on rank s // S whatever expert it holds), which `apply_placements` checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.moe.eplb import placements_from_eplb, rebalance_experts
from workers.moe.experts import RoutedExperts
from workers.moe.load_stats import ExpertLoad
from workers.moe.placement import Placement, rank_loads

__all__ = [
    "RankMoves",
    "RebalanceReport",
    "Transfer",
    "align_placement",
    "apply_placements",
    "current_placements",
    "exchange_expert_weights",
    "plan_moves",
    "plan_rebalance",
    "rebalance_from_load",
]


@dataclass(frozen=True)
class Transfer:
    """One logical expert's weights reaching one rank: once, however many of its new slots there
    hold the expert (the receiver copies the row into each)."""

    logical: int  # the expert whose weights are copied
    src: int  # rank read from, holding `logical` in the old placement: dst if it can, else lowest
    src_index: int  # local slot index on src (old layout) of its first copy of `logical`
    dst: int  # rank written to
    dst_indices: tuple[int, ...]  # local slot indices on dst (new layout) that will hold it


@dataclass(frozen=True)
class RankMoves:
    """One rank's part of an exchange. `send` rows go out grouped by destination rank ascending,
    then logical id; `recv` rows arrive grouped by source rank, then logical id: the order
    `all_to_all_single` keeps, the same on both ends of every pair."""

    send: tuple[Transfer, ...]  # src == this rank != dst
    recv: tuple[Transfer, ...]  # dst == this rank != src
    local: tuple[Transfer, ...]  # src == dst == this rank: a copy inside the rank, no traffic

    def send_splits(self, num_ranks: int) -> list[int]:
        """[N] rows sent to each rank."""
        return _splits([t.dst for t in self.send], num_ranks)

    def recv_splits(self, num_ranks: int) -> list[int]:
        """[N] rows received from each rank."""
        return _splits([t.src for t in self.recv], num_ranks)


def _splits(ranks: list[int], num_ranks: int) -> list[int]:
    out = [0] * num_ranks
    for r in ranks:
        out[r] += 1
    return out


def _check_compatible(old: Placement, new: Placement) -> None:
    if (old.num_logical, old.num_ranks) != (new.num_logical, new.num_ranks):
        raise ValueError(
            f"cannot move from a placement of {old.num_logical} experts on {old.num_ranks} ranks "
            f"to one of {new.num_logical} experts on {new.num_ranks} ranks: a rebalance keeps the "
            f"expert count and the group size (restart the group to change them)"
        )


def plan_moves(old: Placement, new: Placement) -> list[RankMoves]:
    """-> per rank (index = rank) what it sends, receives and copies locally to go from `old` to
    `new`. Pure and deterministic: every rank computes the same plan. A rank receives a logical
    expert at most once; it reads its own copy when it has one (no traffic), otherwise the
    lowest rank holding the expert sends it."""
    _check_compatible(old, new)
    n, s_old = old.num_ranks, old.slots_per_rank
    transfers: list[Transfer] = []
    for dst in range(n):
        held: dict[int, int] = {}  # logical -> first local index on dst, old layout
        for j, e in enumerate(old.logical_of_rank(dst)):
            held.setdefault(e, j)
        wanted: dict[int, list[int]] = {}  # logical -> local indices on dst, new layout
        for i, e in enumerate(new.logical_of_rank(dst)):
            wanted.setdefault(e, []).append(i)
        for e in sorted(wanted):
            if e in held:
                src, src_index = dst, held[e]
            else:  # the lowest slot holding e is the first copy on the lowest rank holding it
                src, src_index = divmod(old.replicas(e)[0], s_old)
            transfers.append(Transfer(e, src, src_index, dst, tuple(wanted[e])))
    return [
        RankMoves(
            send=tuple(
                sorted((t for t in transfers if t.src == r != t.dst), key=_by_dst_then_logical)
            ),
            recv=tuple(
                sorted((t for t in transfers if t.dst == r != t.src), key=_by_src_then_logical)
            ),
            local=tuple(t for t in transfers if t.src == r == t.dst),
        )
        for r in range(n)
    ]


def _by_dst_then_logical(t: Transfer) -> tuple[int, int]:
    return t.dst, t.logical


def _by_src_then_logical(t: Transfer) -> tuple[int, int]:
    return t.src, t.logical


def align_placement(old: Placement, new: Placement) -> Placement:
    """`new` with its ranks relabeled and each rank's slots reordered to keep as many experts
    where `old` has them: the same per-rank expert sets (so the same per-rank loads), fewer
    weights to move. EPLB numbers its packs arbitrarily; this maps each new rank's set to the
    old rank sharing the most distinct experts with it (greedy, ties to lower ranks), then puts
    each expert a rank keeps in its old local slot. Pure and deterministic."""
    _check_compatible(old, new)
    if old.slots_per_rank != new.slots_per_rank:
        return new  # slot positions cannot line up; rank relabeling alone is not worth a rule
    n = old.num_ranks
    old_sets = [set(old.logical_of_rank(r)) for r in range(n)]
    new_sets = [set(new.logical_of_rank(q)) for q in range(n)]
    pairs = sorted(
        ((len(new_sets[q] & old_sets[r]), q, r) for q in range(n) for r in range(n)),
        key=lambda p: (-p[0], p[1], p[2]),
    )
    rank_of: dict[int, int] = {}  # new pack q -> rank it lands on
    taken: set[int] = set()
    for _, q, r in pairs:
        if q not in rank_of and r not in taken:
            rank_of[q] = r
            taken.add(r)
    slots: list[int] = []
    for r in range(n):
        q = next(q for q, rr in rank_of.items() if rr == r)
        pending = new.logical_of_rank(q)  # experts still to place on r, in new's order
        row: list[int | None] = [None] * old.slots_per_rank
        for j, e in enumerate(old.logical_of_rank(r)):  # keep an expert in its old slot
            if e in pending:
                row[j] = e
                pending.remove(e)
        it = iter(pending)
        slots += [e if e is not None else next(it) for e in row]
    return Placement(new.num_logical, n, tuple(slots))


@torch.no_grad()
def exchange_expert_weights(
    experts: RoutedExperts, new: Placement, rank: int, group: dist.ProcessGroup | None = None
) -> RankMoves:
    """Switch `experts` (this rank's slots of one MoE layer) from its current placement to `new`,
    moving weights between ranks with one `all_to_all_single` of flattened slot rows [n, D]
    (skipped by every rank when no rank sends anything). Rows are exact copies, in the weights'
    dtype. Returns this rank's part of the plan.

    Collective, every rank, same layer, same `new`: see the module docstring. Peak memory: this
    layer's old and new slots plus the rows in flight. Call outside `torch.inference_mode()`
    (the new Parameters would become inference tensors)."""
    old = experts.placement
    if old is None:
        raise ValueError(
            "these routed experts have no placement; reshard(placement, rank) them before "
            "loading weights so a rebalance knows which expert each slot holds"
        )
    plan = plan_moves(old, new)
    me, n = plan[rank], new.num_ranks
    w13, w2 = experts.w13.detach(), experts.w2.detach()  # [S_old, 2I, H], [S_old, H, I]
    dev, s, (h, i) = w13.device, new.slots_per_rank, (experts.hidden, experts.intermediate)
    new_w13, new_w2 = w13.new_empty(s, 2 * i, h), w2.new_empty(s, h, i)

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=dev)

    if any(p.send for p in plan):  # the same answer on every rank: the plan is global
        src = index([t.src_index for t in me.send])
        send = torch.cat(  # [n_send, D]
            [w13.index_select(0, src).flatten(1), w2.index_select(0, src).flatten(1)], dim=1
        )
        recv = send.new_empty(len(me.recv), send.shape[1])  # [n_recv, D]
        dist.all_to_all_single(recv, send, me.recv_splits(n), me.send_splits(n), group=group)
        row = index([j for j, t in enumerate(me.recv) for _ in t.dst_indices])
        dst = index([d for t in me.recv for d in t.dst_indices])
        rows = recv.index_select(0, row)
        new_w13.index_copy_(0, dst, rows[:, : 2 * i * h].view(-1, 2 * i, h))
        new_w2.index_copy_(0, dst, rows[:, 2 * i * h :].view(-1, h, i))
    src = index([t.src_index for t in me.local for _ in t.dst_indices])
    dst = index([d for t in me.local for d in t.dst_indices])
    new_w13.index_copy_(0, dst, w13.index_select(0, src))
    new_w2.index_copy_(0, dst, w2.index_select(0, src))
    experts.set_slots(new, rank, new_w13, new_w2)
    return me


def apply_placements(
    layers: Sequence[RoutedExperts],
    placements: Sequence[Placement],
    rank: int,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Move every MoE layer (in order) to its placement; EPLB may give each layer its own.
    Validates all of them before any collective, so every rank (given the same placements)
    fails together instead of deadlocking. Returns the rows sent between ranks, all ranks and
    layers together (the same number on every rank). Collective: see the module docstring."""
    if len(placements) != len(layers):
        raise ValueError(f"need one placement per MoE layer ({len(layers)}), got {len(placements)}")
    olds = current_placements(layers)
    for index, (old, new) in enumerate(zip(olds, placements, strict=True)):
        _check_compatible(old, new)
        if new.num_slots != old.num_slots:
            raise ValueError(
                f"MoE layer {index}: a new placement must keep the {old.num_slots} slots "
                f"(got {new.num_slots}) so the dispatcher's slot -> rank table stays valid"
            )
    moved = 0
    for layer, old, new in zip(layers, olds, placements, strict=True):
        if new != old:  # equal on every rank, so every rank skips the layer together
            moved += sum(len(p.send) for p in plan_moves(old, new))
            exchange_expert_weights(layer, new, rank, group)
    return moved


def current_placements(layers: Sequence[RoutedExperts]) -> list[Placement]:
    """The placement of each MoE layer; raises if one was never resharded."""
    out: list[Placement] = []
    for index, layer in enumerate(layers):
        if layer.placement is None:
            raise ValueError(
                f"MoE layer {index} has no placement; reshard(placement, rank) it before loading "
                f"weights so a rebalance knows which expert each slot holds"
            )
        out.append(layer.placement)
    return out


def plan_rebalance(load: torch.Tensor, old: Sequence[Placement]) -> list[Placement]:
    """load [L, E] picks per logical expert (the whole group's) -> one placement per layer with
    the same slots and ranks, from EPLB (one node, one group: ranks are the GPUs), aligned to
    `old` to move few weights. A layer keeps its placement unless the new one lowers its most
    loaded rank's load (an even split over an expert's copies assumed). Pure."""
    if load.dim() != 2 or load.shape[0] != len(old):
        raise ValueError(f"load must be [{len(old)} layers, experts], got {list(load.shape)}")
    p, n = old[0].num_slots, old[0].num_ranks
    phy2log, _, _ = rebalance_experts(load.double(), p, num_groups=1, num_nodes=1, num_gpus=n)
    fresh = placements_from_eplb(phy2log, n, num_logical=int(load.shape[1]))
    out: list[Placement] = []
    for o, f, w in zip(old, fresh, load, strict=True):
        new = align_placement(o, f)
        better = float(rank_loads(new, w).max()) < float(rank_loads(o, w).max())
        out.append(new if better else o)
    return out


@dataclass(frozen=True)
class RebalanceReport:
    """One rebalance, identical on every rank. Rank loads assume each expert's picks split
    evenly over its copies (what routing does)."""

    step: int  # lockstep group step after which it ran (0 when called directly)
    max_rank_load_before: tuple[float, ...]  # [L] most picks one rank computes, old placement
    max_rank_load_after: tuple[float, ...]  # [L] the same under the new placement
    mean_rank_load: tuple[float, ...]  # [L] picks per rank if perfectly even
    slots_changed: int  # slots, all layers, whose logical expert changed
    rows_moved: int  # expert weight rows sent between ranks, all layers and ranks


def rebalance_from_load(
    layers: Sequence[RoutedExperts],
    load: ExpertLoad,
    rank: int,
    group: dist.ProcessGroup | None = None,
    step: int = 0,
) -> RebalanceReport:
    """All-reduce every rank's expert load window (sum), plan with EPLB (`plan_rebalance`) and
    apply it. With no load observed anywhere nothing moves. Collective: see the module
    docstring; the all-reduce runs on the device the backend needs (NCCL: the counts' CUDA
    device, otherwise CPU)."""
    totals = load.totals()  # [L, E] this rank's own tokens
    if dist.get_backend(group) != dist.Backend.NCCL:
        totals = totals.cpu()
    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    weight = totals.cpu()  # [L, E] the whole group's
    old_p = current_placements(layers)
    new = plan_rebalance(weight, old_p) if int(weight.sum()) > 0 else old_p
    moved = apply_placements(layers, new, rank, group)

    def max_loads(placements: Sequence[Placement]) -> tuple[float, ...]:
        return tuple(float(rank_loads(p, w).max()) for p, w in zip(placements, weight, strict=True))

    return RebalanceReport(
        step=step,
        max_rank_load_before=max_loads(old_p),
        max_rank_load_after=max_loads(new),
        mean_rank_load=tuple(
            float(w.sum()) / p.num_ranks for p, w in zip(old_p, weight, strict=True)
        ),
        slots_changed=sum(
            a != b
            for o, p in zip(old_p, new, strict=True)
            for a, b in zip(o.slot_to_logical, p.slot_to_logical, strict=True)
        ),
        rows_moved=moved,
    )
