"""Placement: contiguous layouts (with and without redundant slots), validation, routing."""

from __future__ import annotations

import pytest
import torch

from workers.moe.placement import Placement, contiguous_placement, rank_loads, route_to_slots


def _check_layout(p: Placement) -> None:
    """Every expert has a copy, every rank the same slots, tables agree with the tuple."""
    assert p.num_slots == p.num_ranks * p.slots_per_rank
    assert sorted({e for e in p.slot_to_logical}) == list(range(p.num_logical))
    for r in range(p.num_ranks):
        assert len(p.slots_of_rank(r)) == p.slots_per_rank
        assert p.logical_of_rank(r) == [p.slot_to_logical[s] for s in p.slots_of_rank(r)]
    tab = p.tables()
    assert tab.slot_to_rank.tolist() == [s // p.slots_per_rank for s in range(p.num_slots)]
    for e in range(p.num_logical):
        reps = p.replicas(e)
        assert reps and all(p.slot_to_logical[s] == e for s in reps)
        assert tab.replica_counts[e] == len(reps)
        row = tab.logical_to_slots[e].tolist()
        assert row[: len(reps)] == reps and all(x == -1 for x in row[len(reps) :])


def test_contiguous_without_redundancy() -> None:
    p = contiguous_placement(8, 4)
    _check_layout(p)
    assert p.num_redundant == 0
    assert [p.logical_of_rank(r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_deepseek_ep144_adds_32_redundant_slots() -> None:
    p = contiguous_placement(256, 144)
    _check_layout(p)
    assert (p.num_slots, p.slots_per_rank, p.num_redundant) == (288, 2, 32)
    assert p == contiguous_placement(256, 144, num_redundant=32)
    # the copies are of the first experts and sit on other ranks than the originals
    assert p.replicas(0) == [0, 256] and p.replicas(31) == [31, 287] and p.replicas(32) == [32]


def test_indivisible_experts_get_redundant_slots() -> None:
    p = contiguous_placement(8, 3)
    _check_layout(p)
    assert (p.num_slots, p.slots_per_rank) == (9, 3)
    assert p.logical_of_rank(2) == [6, 7, 0]


def test_contiguous_more_redundancy_cycles_experts() -> None:
    p = contiguous_placement(4, 2, num_redundant=6)
    _check_layout(p)
    assert [len(p.replicas(e)) for e in range(4)] == [3, 3, 2, 2]


def test_validation_messages_say_the_fix() -> None:
    with pytest.raises(ValueError, match=r"num_redundant = 1 \+ a multiple of 3"):
        contiguous_placement(8, 3, num_redundant=0)
    with pytest.raises(ValueError, match=r"experts \[2\] have no slot"):
        Placement(3, 2, (0, 1, 0, 1))
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        Placement(3, 2, (0, 1, 2))
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        Placement(2, 1, (0, 1, 5, 1))
    with pytest.raises(ValueError, match="rank 4 outside"):
        contiguous_placement(8, 4).slots_of_rank(4)


def test_logical_of_rank_repeats_shared_copies() -> None:
    p = Placement(3, 2, (0, 0, 1, 2))
    assert p.logical_of_rank(0) == [0, 0] and p.replicas(0) == [0, 1]


def test_route_to_slots_hits_a_copy_of_the_right_expert() -> None:
    p = contiguous_placement(256, 144)
    ids = torch.randint(0, 256, (500, 8), generator=torch.Generator().manual_seed(0))
    slots = route_to_slots(ids, p, token_offset=3)
    assert slots.shape == ids.shape and slots.dtype == torch.int64
    s2l = torch.tensor(p.slot_to_logical)
    assert torch.equal(s2l[slots], ids)
    assert torch.equal(route_to_slots(ids, p, token_offset=3), slots)  # deterministic


def test_route_to_slots_spreads_evenly_over_copies() -> None:
    p = Placement(4, 2, (0, 1, 2, 3, 0, 0, 1, 3))  # expert 0: 3 copies, 1 and 3: 2, 2: 1
    # adversarial pattern: expert 0 only on even tokens, so (token mod copies) would skew
    t = 301
    ids = torch.stack([torch.where(torch.arange(t) % 2 == 0, 0, 1), torch.full((t,), 3)], dim=1)
    slots = route_to_slots(ids, p).flatten()
    for e in (0, 1, 3):
        shares = [(slots == s).sum().item() for s in p.replicas(e)]
        picks = (ids == e).sum().item()
        assert sum(shares) == picks and max(shares) - min(shares) <= 1, (e, shares)
    # token_offset rotates which copy takes the remainder
    one = torch.zeros(1, 1, dtype=torch.int64)
    assert [route_to_slots(one, p, token_offset=o).item() for o in range(4)] == [0, 4, 5, 0]


def test_route_to_slots_empty_batch() -> None:
    out = route_to_slots(torch.zeros(0, 8, dtype=torch.int64), contiguous_placement(8, 2))
    assert out.shape == (0, 8)


def test_rank_loads_split_replicated_experts() -> None:
    p = Placement(2, 2, (0, 1, 0, 0))  # expert 0 in slots 0, 2, 3
    loads = rank_loads(p, torch.tensor([30, 10]))
    assert loads.tolist() == [20.0, 20.0]
