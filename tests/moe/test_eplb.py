"""EPLB: packing, replication, global and hierarchical rebalancing, and the load statistics
that feed it."""

from __future__ import annotations

import pytest
import torch

from workers.moe.eplb import (
    balanced_packing,
    placements_from_eplb,
    rebalance_experts,
    replicate_experts,
)
from workers.moe.load_stats import ExpertLoad
from workers.moe.placement import contiguous_placement, rank_loads


def _zipf(num_layers: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """[L, E] Zipf(1) token counts, hot experts at random positions in each layer."""
    g = torch.Generator().manual_seed(seed)
    z = 1e4 / torch.arange(1, num_experts + 1, dtype=torch.float64)
    return torch.stack([z[torch.randperm(num_experts, generator=g)] for _ in range(num_layers)])


@pytest.mark.parametrize("num_packs,per_pack", [(2, 3), (4, 4), (8, 1), (6, 5)])
def test_balanced_packing_equal_counts_and_close_loads(num_packs: int, per_pack: int) -> None:
    n = num_packs * per_pack
    g = torch.Generator().manual_seed(n)
    weight = torch.cat([torch.rand(3, n, generator=g) ** 4 * 100, _zipf(2, n)])  # [5, n]
    pack, rank = balanced_packing(weight, num_packs)
    for w, p, r in zip(weight, pack, rank, strict=True):
        assert torch.bincount(p, minlength=num_packs).tolist() == [per_pack] * num_packs
        assert len(set(zip(p.tolist(), r.tolist(), strict=True))) == n  # (pack, rank) unique
        assert set(r.tolist()) == set(range(per_pack))
        loads = torch.zeros(num_packs, dtype=torch.float64).index_add_(0, p, w.double())
        assert loads.max() - loads.min() <= w.max() + 1e-9


def test_balanced_packing_rejects_uneven_split() -> None:
    with pytest.raises(ValueError, match="cannot fill 4 packs"):
        balanced_packing(torch.ones(1, 6), 4)


def test_replicate_experts_copies_the_hottest_per_copy() -> None:
    phy2log, rank, cnt = replicate_experts(torch.tensor([[10.0, 1.0], [6.0, 5.0]]), 4)
    assert phy2log.tolist() == [[0, 1, 0, 0], [0, 1, 0, 1]]
    assert rank.tolist() == [[0, 0, 1, 2], [0, 0, 1, 1]]
    assert cnt.tolist() == [[3, 1], [2, 2]]


def _check_eplb(weight, phy2log, log2phy, logcnt, num_replicas: int, num_gpus: int) -> None:
    num_layers, num_log = weight.shape
    assert phy2log.shape == (num_layers, num_replicas)
    assert log2phy.shape == (num_layers, num_log, num_replicas - num_log + 1)
    for l in range(num_layers):
        assert torch.equal(torch.bincount(phy2log[l], minlength=num_log), logcnt[l])
        assert (logcnt[l] >= 1).all()  # every expert keeps a copy
        for e in range(num_log):
            slots = log2phy[l, e, : logcnt[l, e]]
            assert (phy2log[l, slots] == e).all() and (log2phy[l, e, logcnt[l, e] :] == -1).all()
    for p in placements_from_eplb(phy2log, num_gpus):  # equal slots per rank, validated
        assert p.slots_per_rank == num_replicas // num_gpus and p.num_logical == num_log


@pytest.mark.parametrize(
    "num_experts,num_replicas,num_groups,num_nodes,num_gpus",
    [
        (256, 288, 8, 18, 144),  # DeepSeek EP144: 8 % 18 != 0 -> global
        (64, 80, 8, 2, 16),  # hierarchical
        (256, 320, 8, 4, 32),  # hierarchical, 2 groups per node
    ],
)
def test_rebalance_beats_contiguous_on_zipf(
    num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    weight = _zipf(3, num_experts)
    phy2log, log2phy, logcnt = rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus
    )
    _check_eplb(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus)
    contiguous = contiguous_placement(num_experts, num_gpus, num_replicas - num_experts)
    for w, p in zip(weight, placements_from_eplb(phy2log, num_gpus), strict=True):
        balanced, naive = rank_loads(p, w).max(), rank_loads(contiguous, w).max()
        assert balanced < 0.5 * naive, (balanced, naive)


def test_hierarchical_keeps_each_group_on_one_node() -> None:
    num_experts, num_groups, num_nodes, num_gpus, num_replicas = 32, 8, 4, 8, 48
    weight = _zipf(4, num_experts, seed=1)
    phy2log, log2phy, logcnt = rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus
    )
    _check_eplb(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus)
    group_size, slots_per_node = num_experts // num_groups, num_replicas // num_nodes
    for l in range(weight.shape[0]):
        groups_of_node = [set() for _ in range(num_nodes)]
        for slot, e in enumerate(phy2log[l].tolist()):
            groups_of_node[slot // slots_per_node].add(e // group_size)
        # each node holds exactly its share of whole groups, and no group spans two nodes
        assert all(len(gs) == num_groups // num_nodes for gs in groups_of_node)
        assert sorted(g for gs in groups_of_node for g in gs) == list(range(num_groups))


def test_rebalance_is_deterministic_and_validates() -> None:
    weight = _zipf(2, 16)
    first = rebalance_experts(weight, 20, 4, 2, 4)
    again = rebalance_experts(weight, 20, 4, 2, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="multiple of num_gpus=4; e.g. 16"):
        rebalance_experts(weight, 18, 4, 2, 4)
    with pytest.raises(ValueError, match="num_groups=3 must divide"):
        rebalance_experts(weight, 20, 3, 1, 4)
    with pytest.raises(ValueError, match=r"experts \[4\] have no slot"):
        placements_from_eplb(torch.tensor([[0, 1, 2, 3]]), 2, num_logical=5)


def test_expert_load_window_drops_old_steps() -> None:
    stats = ExpertLoad(num_layers=2, num_experts=4, window=2)
    stats.record(0, torch.tensor([[0, 1], [0, 2]]))
    stats.record(1, torch.tensor([[3, 3]]))
    assert stats.totals().tolist() == [[2, 1, 1, 0], [0, 0, 0, 2]]
    stats.step()
    stats.record(0, torch.tensor([[1, 1]]))
    assert stats.totals().tolist() == [[2, 3, 1, 0], [0, 0, 0, 2]]
    stats.step()  # the first step leaves the window of 2
    assert stats.totals().tolist() == [[0, 2, 0, 0], [0, 0, 0, 0]]
    stats.step()
    assert stats.totals().sum() == 0 and stats.num_steps == 3
    stats.record(1, torch.tensor([[2]]))
    stats.reset()
    assert stats.totals().sum() == 0 and stats.num_steps == 0
    with pytest.raises(ValueError, match="layer 2 outside"):
        stats.record(2, torch.tensor([[0]]))


@pytest.mark.parametrize("window", [1, 3, 8])
def test_expert_load_totals_equal_the_sum_over_the_window(window: int) -> None:
    """The running sum of ended steps agrees with summing the last `window` steps' picks."""
    g = torch.Generator().manual_seed(window)
    stats, steps = ExpertLoad(num_layers=3, num_experts=5, window=window), []
    for _ in range(4 * window + 3):
        step = torch.zeros(3, 5, dtype=torch.int64)
        for layer in range(3):
            ids = torch.randint(0, 5, (int(torch.randint(0, 6, (1,), generator=g)), 2), generator=g)
            stats.record(layer, ids)
            step[layer] += torch.bincount(ids.reshape(-1), minlength=5)
        steps.append(step)
        assert torch.equal(stats.totals(), torch.stack(steps[-window:]).sum(0))
        stats.step()
