"""Rebalancing a running group: the move plan (pure), and on 2 gloo ranks the weight exchange
must leave every slot holding exactly its new expert's weights while dispatch -> experts ->
combine keeps giving the single-rank MoE output, before and after the switch.

Legend: T tokens, H hidden, I intermediate, E logical experts, K top-k, S slots per rank.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.spawn import gloo_rank, run_spawned
from workers.moe.dispatch import AllToAllDispatcher
from workers.moe.experts import RoutedExperts
from workers.moe.gating import softmax_topk
from workers.moe.placement import Placement, contiguous_placement, rank_loads
from workers.moe.rebalance import align_placement, apply_placements, plan_moves, plan_rebalance
from workers.moe.rebalance import exchange_expert_weights as exchange

pytestmark = pytest.mark.timeout(120)

H, I, E, K, WORLD = 32, 16, 8, 2, 2
JOIN_TIMEOUT_S = 90


def P(*slots: int) -> Placement:
    return Placement(E, WORLD, slots)


CONTIGUOUS = contiguous_placement(E, WORLD)  # (0..7): rank 0 holds 0-3, rank 1 4-7
PERMUTED = P(5, 2, 7, 0, 1, 6, 3, 4)
WITH_COPIES = contiguous_placement(E, WORLD, num_redundant=2)  # (0..7, 0, 1)
COPIES = P(3, 3, 0, 1, 5, 2, 4, 6, 7, 3)  # expert 3 three times, twice on rank 0
COPIES_AGAIN = P(7, 6, 5, 4, 7, 3, 2, 1, 0, 0)  # almost everything swaps ranks

PAIRS = [
    (CONTIGUOUS, CONTIGUOUS),
    (CONTIGUOUS, PERMUTED),
    (PERMUTED, CONTIGUOUS),
    (WITH_COPIES, COPIES),
    (COPIES, COPIES_AGAIN),
    (COPIES_AGAIN, WITH_COPIES),
]


# --- the plan: pure -----------------------------------------------------------------------------
@pytest.mark.parametrize("old,new", PAIRS)
def test_plan_fills_every_new_slot_once_from_a_holder(old: Placement, new: Placement) -> None:
    assert not dist.is_initialized()  # pure: no process group needed
    plan = plan_moves(old, new)
    assert plan == plan_moves(old, new)  # deterministic
    for r, moves in enumerate(plan):
        filled = [i for t in moves.recv + moves.local for i in t.dst_indices]
        assert sorted(filled) == list(range(new.slots_per_rank)), "a slot filled twice or never"
        for t in moves.recv + moves.local:
            assert t.dst == r and all(new.logical_of_rank(r)[i] == t.logical for i in t.dst_indices)
            assert old.logical_of_rank(t.src)[t.src_index] == t.logical  # the source has it
            held_here = t.logical in old.logical_of_rank(r)
            holders = [q for q in range(WORLD) if t.logical in old.logical_of_rank(q)]
            assert t.src == (r if held_here else min(holders))
            assert old.logical_of_rank(t.src).index(t.logical) == t.src_index  # its first copy
        assert all(t.src == t.dst == r for t in moves.local)
        got = Counter((t.dst, t.logical) for t in moves.recv + moves.local)
        assert max(got.values()) == 1, "an expert reaches a rank more than once"
    for a in range(WORLD):  # both ends of every pair agree on the rows and their order
        for b in range(WORLD):
            if a != b:
                assert [t for t in plan[a].send if t.dst == b] == [
                    t for t in plan[b].recv if t.src == a
                ]
        assert plan[a].send_splits(WORLD)[a] == 0 == plan[a].recv_splits(WORLD)[a]
    if old == new:
        assert not any(m.send or m.recv for m in plan)


def test_plan_sends_an_expert_once_per_rank_however_many_slots_need_it() -> None:
    plan = plan_moves(WITH_COPIES, COPIES)  # rank 0 needs expert 3 twice: it already has it
    assert [(t.logical, t.dst_indices) for t in plan[0].local if t.logical == 3] == [(3, (0, 1))]
    plan = plan_moves(COPIES, COPIES_AGAIN)  # rank 0 needs 7 twice and lacks it: one row
    (seven,) = [t for t in plan[0].recv if t.logical == 7]
    assert (seven.src, seven.dst_indices) == (1, (0, 4))
    assert plan[0].recv_splits(WORLD) == [0, 3]  # 7, 6, 4 (5 stays)
    assert [t.logical for t in plan[1].send] == [4, 6, 7]  # ordered by logical id


def test_plan_rejects_another_group_size() -> None:
    with pytest.raises(ValueError, match="group size"):
        plan_moves(CONTIGUOUS, contiguous_placement(E, 4))


def _rank_sets(p: Placement) -> Counter:
    return Counter(tuple(sorted(p.logical_of_rank(r))) for r in range(p.num_ranks))


def _rows_sent(old: Placement, new: Placement) -> int:
    return sum(len(m.send) for m in plan_moves(old, new))


@pytest.mark.parametrize("old,new", PAIRS[1:])
def test_align_keeps_rank_sets_and_moves_no_more(old: Placement, new: Placement) -> None:
    aligned = align_placement(old, new)
    assert _rank_sets(aligned) == _rank_sets(new)  # the same loads per rank, relabeled
    assert _rows_sent(old, aligned) <= _rows_sent(old, new)
    # the ranks' contents swapped and each reversed: the same layout under other labels
    relabeled = P(*old.logical_of_rank(1)[::-1], *old.logical_of_rank(0)[::-1])
    assert _rows_sent(old, relabeled) > 0
    assert align_placement(old, relabeled) == old


def test_plan_rebalance_lowers_the_hottest_rank_and_keeps_idle_layers() -> None:
    load = torch.tensor([[90, 80, 70, 60, 4, 3, 2, 1], [0] * E])  # [L=2, E]
    new = plan_rebalance(load, [WITH_COPIES, WITH_COPIES])
    assert new[1] == WITH_COPIES  # no load observed: nothing to gain from moving
    assert new[0].num_slots == WITH_COPIES.num_slots
    before, after = rank_loads(WITH_COPIES, load[0]).max(), rank_loads(new[0], load[0]).max()
    assert after < before
    assert new == plan_rebalance(load, [WITH_COPIES, WITH_COPIES])


# --- the exchange on 2 gloo ranks ---------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    name: str
    start: Placement
    steps: tuple[Placement, ...]  # placements switched to, in order
    dtype: torch.dtype = torch.float32


LAYERS = [
    Layer("permuted", CONTIGUOUS, (PERMUTED, CONTIGUOUS)),
    Layer("copies", WITH_COPIES, (COPIES, COPIES_AGAIN)),
    Layer("bf16", CONTIGUOUS, (PERMUTED, PERMUTED), torch.bfloat16),  # 2nd: unchanged, skipped
]


def full_weights(layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """-> w13 [E, 2I, H], w2 [E, H, I]: every logical expert, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + layer)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    return w13.to(dtype), w2.to(dtype)


def make_inputs(layer: int, rank: int, dtype: torch.dtype):
    """-> x [T, H], logical topk_ids [T, K], topk_weights [T, K]; rank 1 has no tokens in
    layer 2 (it still takes part in every collective)."""
    t = 0 if (layer, rank) == (2, 1) else 5 + 3 * rank
    g = torch.Generator().manual_seed(31 * layer + rank)
    x = torch.randn(t, H, generator=g).to(dtype)
    ids, weights = softmax_topk(torch.randn(t, E, generator=g), K, renormalize=True)
    return x, ids, weights


def _moe(experts: RoutedExperts, dispatcher: AllToAllDispatcher, inputs) -> torch.Tensor:
    experts.dispatcher = dispatcher
    return experts(*inputs)


def _child(rank: int, tmp: str) -> None:
    with gloo_rank(rank, WORLD, tmp):
        torch.save(_run(rank), f"{tmp}/rank{rank}.pt")


def _run(rank: int) -> dict:
    """Per layer: a forward before and after each switch, and the weights after it. Switch 1 goes
    layer by layer (`exchange_expert_weights`), switch 2 through `apply_placements`."""
    modules, dispatchers = [], []
    for index, layer in enumerate(LAYERS):
        m = RoutedExperts(E, range(E), H, I).to(layer.dtype)
        m.reshard(layer.start, rank)
        w13, w2 = full_weights(index, layer.dtype)
        slots = layer.start.logical_of_rank(rank)
        with torch.no_grad():
            m.w13.copy_(w13[slots])
            m.w2.copy_(w2[slots])
        m.layer_index = index
        modules.append(m)
        dispatchers.append(AllToAllDispatcher(layer.start.tables().slot_to_rank))
    inputs = [make_inputs(i, rank, layer.dtype) for i, layer in enumerate(LAYERS)]
    out: dict = {layer.name: {"y": [], "w13": [], "w2": [], "recv": []} for layer in LAYERS}

    def forward_all() -> None:
        for m, d, x, layer in zip(modules, dispatchers, inputs, LAYERS, strict=True):
            out[layer.name]["y"].append(_moe(m, d, x))

    forward_all()
    for step in range(2):
        if step == 0:
            for m, layer in zip(modules, LAYERS, strict=True):
                moves = exchange(m, layer.steps[0], rank)
                out[layer.name]["recv"].append(len(moves.recv))
        else:
            out["moved"] = apply_placements(modules, [la.steps[1] for la in LAYERS], rank)
        for m, layer in zip(modules, LAYERS, strict=True):
            out[layer.name]["w13"].append(m.w13.detach().clone())
            out[layer.name]["w2"].append(m.w2.detach().clone())
            out[layer.name]["placement"] = m.placement
        forward_all()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("rebalance")
    run_spawned(_child, (str(tmp),), WORLD, tmp, JOIN_TIMEOUT_S)
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=[la.name for la in LAYERS])
def test_slots_hold_their_new_experts_weights(results, index: int) -> None:
    layer = LAYERS[index]
    w13, w2 = full_weights(index, layer.dtype)
    for rank, res in enumerate(results):
        got = res[layer.name]
        assert got["placement"] == layer.steps[-1]
        for step, new in enumerate(layer.steps):
            logical = new.logical_of_rank(rank)
            assert got["w13"][step].dtype == layer.dtype
            assert torch.equal(got["w13"][step], w13[logical]), f"step {step}: w13 of {logical}"
            assert torch.equal(got["w2"][step], w2[logical]), f"step {step}: w2 of {logical}"
        old = layer.start
        assert got["recv"] == [len(plan_moves(old, layer.steps[0])[rank].recv)]


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=[la.name for la in LAYERS])
def test_moe_output_unchanged_by_the_switch(results, index: int) -> None:
    layer = LAYERS[index]
    reference = RoutedExperts(E, range(E), H, I).to(layer.dtype)  # one rank, every expert
    with torch.no_grad():
        reference.w13.copy_(full_weights(index, layer.dtype)[0])
        reference.w2.copy_(full_weights(index, layer.dtype)[1])
    f32 = layer.dtype == torch.float32
    tol = {"atol": 1e-5, "rtol": 1e-5} if f32 else {"atol": 5e-2, "rtol": 2e-2}
    for rank, res in enumerate(results):
        want = reference(*make_inputs(index, rank, layer.dtype))
        ys = res[layer.name]["y"]
        assert len(ys) == 3  # before, after switch 1, after switch 2
        for y in ys:
            torch.testing.assert_close(y, want, **tol)


def test_apply_placements_counts_rows_and_skips_unchanged_layers(results) -> None:
    want = sum(_rows_sent(la.steps[0], la.steps[1]) for la in LAYERS if la.steps[0] != la.steps[1])
    assert want > 0
    assert [res["moved"] for res in results] == [want] * WORLD
