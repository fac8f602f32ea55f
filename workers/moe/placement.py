"""Where experts live: logical experts -> physical slots -> expert-parallel ranks.

Legend: E logical experts, N ranks (EP size), P physical slots (P = N * S), S slots per rank,
T tokens, K experts per token, M most copies of one expert.
A slot holds one copy of one logical expert's weights; rank r holds slots r*S .. (r+1)*S - 1.
An expert with several copies ("redundant" slots) has its tokens split over them.
Everything here is plain data and pure functions: no process groups, no collectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

__all__ = ["Placement", "RoutingTables", "contiguous_placement", "rank_loads", "route_to_slots"]


@dataclass(frozen=True)
class RoutingTables:
    """A placement as tensors on one device, for vectorized routing. Shared: do not mutate."""

    slot_to_rank: torch.Tensor  # [P] int64: rank holding each slot
    logical_to_slots: torch.Tensor  # [E, M] int64: slots holding each expert, ascending, -1 pad
    replica_counts: torch.Tensor  # [E] int64: copies of each expert (>= 1)


@dataclass(frozen=True)
class Placement:
    """Which logical expert each physical slot holds. Validated on construction: every expert
    has at least one copy and every rank the same number of slots."""

    num_logical: int  # E
    num_ranks: int  # N
    slot_to_logical: tuple[int, ...]  # [P] slot -> logical expert; rank r: slots r*S .. (r+1)*S-1
    # per-device RoutingTables, filled lazily by `tables`; not part of equality or hashing
    _tables: dict[str, RoutingTables] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        e, n, p = self.num_logical, self.num_ranks, len(self.slot_to_logical)
        if e < 1 or n < 1:
            raise ValueError(f"need num_logical >= 1 and num_ranks >= 1, got {e} and {n}")
        if p < n or p % n:
            raise ValueError(
                f"{p} slots cannot be split evenly over {n} ranks: the slot count must be a "
                f"positive multiple of num_ranks (add or drop redundant slots)"
            )
        bad = sorted({x for x in self.slot_to_logical if not 0 <= x < e})
        if bad:
            raise ValueError(f"slots name experts {bad[:8]} outside [0, {e}) (num_logical={e})")
        missing = sorted(set(range(e)) - set(self.slot_to_logical))
        if missing:
            raise ValueError(
                f"experts {missing[:8]}{'...' if len(missing) > 8 else ''} have no slot; every "
                f"logical expert needs at least one copy (give them slots, e.g. in place of "
                f"redundant copies)"
            )

    @property
    def slots_per_rank(self) -> int:
        return len(self.slot_to_logical) // self.num_ranks

    @property
    def num_slots(self) -> int:
        return len(self.slot_to_logical)

    @property
    def num_redundant(self) -> int:
        """Slots beyond one per logical expert."""
        return self.num_slots - self.num_logical

    @cached_property
    def is_identity(self) -> bool:
        """Slot i holds expert i, one copy each: routing ids need no mapping."""
        return self.slot_to_logical == tuple(range(self.num_logical))

    def slots_of_rank(self, rank: int) -> list[int]:
        self._check_rank(rank)
        s = self.slots_per_rank
        return list(range(rank * s, (rank + 1) * s))

    def logical_of_rank(self, rank: int) -> list[int]:
        """The expert held in each of `rank`'s slots, in slot order (length S). An expert repeats
        when two of its copies share the rank (EPLB may do that); the weights to load are
        `sorted(set(...))`, the compute layout is this list."""
        s = self.slots_per_rank
        self._check_rank(rank)
        return list(self.slot_to_logical[rank * s : (rank + 1) * s])

    def replicas(self, logical: int) -> list[int]:
        """Slots holding `logical`, ascending."""
        if not 0 <= logical < self.num_logical:
            raise ValueError(f"logical expert {logical} outside [0, {self.num_logical})")
        return list(self._replicas[logical])

    def tables(self, device: torch.device | str = "cpu") -> RoutingTables:
        """The placement as tensors on `device`, built once per device and cached."""
        key = str(torch.device(device))
        if key not in self._tables:
            cpu = self._cpu_tables
            self._tables[key] = RoutingTables(
                *(
                    t.to(device)
                    for t in (cpu.slot_to_rank, cpu.logical_to_slots, cpu.replica_counts)
                )
            )
        return self._tables[key]

    @cached_property
    def _replicas(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in range(self.num_logical)]
        for slot, e in enumerate(self.slot_to_logical):
            out[e].append(slot)
        return tuple(tuple(r) for r in out)

    @cached_property
    def _cpu_tables(self) -> RoutingTables:
        reps = self._replicas
        width = max(len(r) for r in reps)
        l2s = torch.full((self.num_logical, width), -1, dtype=torch.int64)  # [E, M]
        for e, r in enumerate(reps):
            l2s[e, : len(r)] = torch.tensor(r, dtype=torch.int64)
        s2r = torch.arange(self.num_slots, dtype=torch.int64) // self.slots_per_rank  # [P]
        counts = torch.tensor([len(r) for r in reps], dtype=torch.int64)  # [E]
        return RoutingTables(s2r, l2s, counts)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} outside [0, {self.num_ranks})")


def contiguous_placement(
    num_logical: int, num_ranks: int, num_redundant: int | None = None
) -> Placement:
    """Experts in order, cut into equal runs of slots: slots 0..E-1 hold experts 0..E-1 and the
    R redundant slots after them hold copies of experts 0, 1, ... (cycling if R > E), so with
    R = 0 rank r holds experts r*E/N .. (r+1)*E/N - 1.

    `num_redundant=None` adds the fewest copies that give every rank the same slot count,
    (-E) mod N: 256 experts on 144 ranks -> 32 copies, 288 slots, 2 per rank. An explicit count
    must make E + R a multiple of N. Use EPLB (`workers.moe.eplb`) to choose copies by load.
    """
    if num_logical < 1 or num_ranks < 1:
        raise ValueError(
            f"need num_logical >= 1 and num_ranks >= 1, got {num_logical} and {num_ranks}"
        )
    fewest = -num_logical % num_ranks
    r = fewest if num_redundant is None else num_redundant
    if r < 0 or (num_logical + r) % num_ranks:
        raise ValueError(
            f"num_redundant={num_redundant} gives {num_logical} experts + {r} copies = "
            f"{num_logical + r} slots, which {num_ranks} ranks cannot share evenly; use "
            f"num_redundant = {fewest} + a multiple of {num_ranks} (or None for {fewest})"
        )
    slots = tuple(range(num_logical)) + tuple(i % num_logical for i in range(r))
    return Placement(num_logical, num_ranks, slots)


def route_to_slots(
    topk_ids: torch.Tensor, placement: Placement, token_offset: int = 0
) -> torch.Tensor:
    """topk_ids [T, K] logical ids in [0, E) -> [T, K] int64 physical slots.

    A replicated expert's picks are dealt round-robin over its copies in (token, k) order: the
    j-th pick of expert e in this batch goes to copy (j + token_offset) mod count(e). Within one
    call the copies' shares differ by at most one, whatever the pattern of picks. Deterministic
    (no randomness), so every rank computes the same answer for the same input; pass a different
    `token_offset` per rank or per step to rotate which copy takes the remainder.
    Ids outside [0, E) are not checked (that would sync the device); they raise on indexing.
    """
    t, k = topk_ids.shape
    tab = placement.tables(topk_ids.device)
    flat = topk_ids.reshape(-1).long()  # [T*K]
    if flat.numel() == 0 or placement.is_identity:  # slot i holds expert i: nothing to map
        return flat.view(t, k)
    if placement.num_redundant == 0:  # one copy each: a lookup (a decode step's ~10 ops less)
        return tab.logical_to_slots[flat, 0].view(t, k)
    # occurrence index of each pick among picks of its expert: stable sort by expert, then the
    # position in the sorted run. index_add_ instead of bincount: a fixed [E] size, no host sync.
    order = torch.argsort(flat, stable=True)  # [T*K]
    sorted_ids = flat[order]
    per_expert = torch.zeros(placement.num_logical, dtype=torch.int64, device=flat.device)
    per_expert.index_add_(0, flat, torch.ones_like(flat))  # [E]
    run_start = per_expert.cumsum(0) - per_expert  # [E]
    occurrence = torch.empty_like(flat)
    occurrence[order] = torch.arange(flat.numel(), device=flat.device) - run_start[sorted_ids]
    replica = (occurrence + token_offset) % tab.replica_counts[flat]  # [T*K]
    return tab.logical_to_slots[flat, replica].view(t, k)


def rank_loads(placement: Placement, load: torch.Tensor) -> torch.Tensor:
    """load [E] (tokens per logical expert) -> [N] float64 tokens per rank, assuming an expert's
    copies split its load evenly (what `route_to_slots` does)."""
    if load.shape != (placement.num_logical,):
        raise ValueError(f"load must have shape [{placement.num_logical}], got {list(load.shape)}")
    tab = placement.tables(load.device)
    s2l = torch.tensor(placement.slot_to_logical, device=load.device)  # [P]
    per_slot = load.double()[s2l] / tab.replica_counts[s2l]  # [P]
    return per_slot.view(placement.num_ranks, placement.slots_per_rank).sum(-1)
