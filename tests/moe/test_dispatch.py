"""Dispatch -> experts -> combine on 2 and 4 gloo ranks must equal the single-rank MoE layer.

One spawn per world size runs every case twice (two "steps") inside the children, one MoE layer
index per case, and saves what it saw; the parent recomputes inputs, the single-rank reference
and the byte floor independently and asserts. Legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.spawn import gloo_rank, run_spawned
from workers import kernels
from workers.moe.dispatch import AllToAllDispatcher, LocalDispatcher, make_dispatcher
from workers.moe.experts import RoutedExperts
from workers.moe.gating import softmax_topk

pytestmark = pytest.mark.timeout(180)

H, I = 32, 16
JOIN_TIMEOUT_S = 120


@dataclass(frozen=True)
class Case:
    name: str
    counts: tuple[int, int, int, int]  # T per rank (world 2 uses the first two)
    routing: str  # random | one_rank | hot_expert | dedupe
    k: int
    dtype: torch.dtype = torch.float32


CASES = [
    Case("random", (6, 3, 9, 4), "random", 4),
    Case("zero_tokens", (5, 0, 7, 0), "random", 3),
    Case("all_empty", (0, 0, 0, 0), "random", 2),
    Case("one_rank", (4, 5, 3, 6), "one_rank", 2),
    Case("hot_expert", (5, 2, 4, 3), "hot_expert", 1),
    Case("dedupe", (6, 4, 5, 7), "dedupe", 2),
    Case("bf16", (7, 5, 0, 6), "random", 4, torch.bfloat16),
]


def num_experts(world: int) -> int:
    return 8 if world == 2 else 16


def owner(expert: int, world: int) -> int:
    """Contiguous slices: rank r owns experts [r*E/W, (r+1)*E/W)."""
    return expert // (num_experts(world) // world)


def make_inputs(case: Case, world: int, rank: int):
    """-> x [T, H] case.dtype, topk_ids [T, K] int64, topk_weights [T, K] fp32; deterministic."""
    e, t, per = num_experts(world), case.counts[rank], num_experts(world) // world
    g = torch.Generator().manual_seed(7919 * world + 101 * rank + CASES.index(case))
    x = torch.randn(t, H, generator=g).to(case.dtype)
    logits = torch.randn(t, e, generator=g)
    if case.routing == "one_rank":  # every expert of every token on the last rank
        logits[:, : (world - 1) * per] = float("-inf")
    if case.routing == "hot_expert":  # every token to expert 1
        logits[:, 1] += 100.0
    ids, weights = softmax_topk(logits, case.k, renormalize=case.routing == "random")
    if case.routing == "dedupe":  # both experts of token i on rank (i + rank) % W
        dest = (torch.arange(t) + rank) % world
        pick = torch.stack([torch.randperm(per, generator=g)[:2] for _ in range(t)])
        ids = dest[:, None] * per + pick  # [T, 2]
    return x, ids, weights


def make_experts(world: int, owned: list[int], dtype: torch.dtype) -> RoutedExperts:
    """The same full expert weights on every rank (shared seed), restricted to `owned`."""
    e = num_experts(world)
    g = torch.Generator().manual_seed(1234)
    w13 = torch.randn(e, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(e, H, I, generator=g) * I**-0.5
    experts = RoutedExperts(e, owned, H, I)
    with torch.no_grad():
        experts.w13.copy_(w13[owned])
        experts.w2.copy_(w2[owned])
    return experts.to(dtype)


def _child(rank: int, world: int, transport: str, tmp: str) -> None:
    """transport "shm+kernels": the shared-memory path with the C++ kernels (ep.cpp; they run
    with autograd off), "shm+mixed": kernels on rank 0 only (the same bytes on the wire)."""
    transport, _, kernels_on = transport.partition("+")
    fast = kernels_on == "kernels" or (kernels_on == "mixed" and rank == 0)
    with gloo_rank(rank, world, tmp):
        with torch.inference_mode(fast):  # the engine's mode: the kernels run
            out = _run_cases(rank, world, transport)
        out["kernels"] = fast and kernels.kernel("ep_plan") is not None
        torch.save(out, f"{tmp}/rank{rank}.pt")


def _run_cases(rank: int, world: int, transport: str) -> dict:
    """Every case, one MoE layer index each, twice (two steps); then a counters reset."""
    e = num_experts(world)
    e2r = torch.tensor([owner(i, world) for i in range(e)])
    owned = [i for i in range(e) if owner(i, world) == rank]
    out: dict = {"rank": rank}
    try:
        AllToAllDispatcher(torch.full((e,), world))
    except ValueError as err:
        out["bad_e2r_error"] = str(err)
    dispatcher = make_dispatcher("auto", e2r, transport=transport)
    out["backend"] = type(dispatcher).__name__
    out["shm"] = getattr(dispatcher, "shm", None) is not None
    with torch.inference_mode(False):  # built outside inference mode, as the engine's model
        experts = {dt: make_experts(world, owned, dt) for dt in (torch.float32, torch.bfloat16)}
    for step in range(2):
        for layer, case in enumerate(CASES):
            with torch.enable_grad():  # the parent's inputs (the routing kernel rounds apart)
                x, ids, w = make_inputs(case, world, rank)
            d = dispatcher.dispatch(x, ids, w, layer=layer)
            part = experts[case.dtype](d.recv_x, d.recv_topk_ids, d.recv_topk_weights)
            y = dispatcher.combine(part, d.handle)
            if step == 0:
                out[case.name] = {
                    "y": y,
                    "recv_x": d.recv_x.clone(),  # a reused buffer: valid until the next dispatch
                    "recv_ids": d.recv_topk_ids,
                    "recv_weights": d.recv_topk_weights,
                    "last": asdict(dispatcher.counters.last[layer]),
                }
            else:
                out[case.name]["y_again"] = y
                out[case.name]["total"] = asdict(dispatcher.counters.total[layer])
    # the reused buffers serve calls in and out of inference mode alike
    with torch.inference_mode(not torch.is_inference_mode_enabled()), torch.enable_grad():
        x, ids, w = make_inputs(CASES[0], world, rank)
        d = dispatcher.dispatch(x, ids, w, layer=0)
        y = dispatcher.combine(
            experts[x.dtype](d.recv_x, d.recv_topk_ids, d.recv_topk_weights), d.handle
        )
        # the expert FFN's kernel runs in one mode only: equal within rounding
        out["other_mode_equal"] = torch.allclose(y, out[CASES[0].name]["y"], 1e-5, 1e-5)
    dispatcher.counters.reset()
    out["after_reset"] = (len(dispatcher.counters.total), len(dispatcher.counters.last))
    dispatcher.close()
    return out


# "shm": rows through shared memory (workers/moe/shm_exchange.py), "collective": gloo's
# all-to-alls; both must give the same rows and results
@pytest.fixture(
    scope="module",
    params=[
        *((2, "shm"), (4, "shm"), (2, "collective"), (4, "collective")),
        *((2, "shm+kernels"), (4, "shm+kernels"), (2, "shm+mixed")),
    ],
    ids=lambda p: f"world{p[0]}-{p[1]}",
)
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world, transport = request.param
    tmp = tmp_path_factory.mktemp(f"dispatch{world}{transport}")
    run_spawned(_child, (world, transport, str(tmp)), world, tmp, JOIN_TIMEOUT_S)
    results = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    assert all(res["shm"] == transport.startswith("shm") for res in results), "transport not taken"
    if transport.endswith("kernels") and kernels.kernel("ep_plan") is not None:
        assert all(res["kernels"] for res in results), "the ep.cpp kernels did not run"
    return world, results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_rank(ranks, case: Case) -> None:
    world, results = ranks
    reference = make_experts(world, list(range(num_experts(world))), case.dtype)
    tol = (
        {"atol": 1e-5, "rtol": 1e-5}
        if case.dtype == torch.float32
        else {"atol": 5e-2, "rtol": 2e-2}
    )
    for rank, res in enumerate(results):
        x, ids, w = make_inputs(case, world, rank)
        y = res[case.name]["y"]
        assert y.shape == x.shape and y.dtype == case.dtype
        torch.testing.assert_close(y, reference(x, ids, w), **tol)
        assert torch.equal(res[case.name]["y_again"], y), "combine is not deterministic"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_received_rows(ranks, case: Case) -> None:
    """Each rank receives, per source rank (its own rows first, then the others in order), each
    token routed to it exactly once, with its full top-k row and bit-exact weights."""
    world, results = ranks
    inputs = [make_inputs(case, world, r) for r in range(world)]
    for rank, res in enumerate(results):
        want_x, want_ids, want_w = [], [], []
        for x, ids, w in [inputs[rank]] + inputs[:rank] + inputs[rank + 1 :]:
            to_me = [rank in {owner(e, world) for e in row} for row in ids.tolist()]
            mask = torch.tensor(to_me, dtype=torch.bool)  # [T]
            want_x.append(x[mask])
            want_ids.append(ids[mask])
            want_w.append(w[mask])
        got = res[case.name]
        assert torch.equal(got["recv_x"], torch.cat(want_x))
        assert torch.equal(got["recv_ids"], torch.cat(want_ids))
        assert got["recv_weights"].dtype == torch.float32
        assert torch.equal(got["recv_weights"], torch.cat(want_w))


def floor(case: Case, world: int, rank: int) -> dict[str, int]:
    """The minimal traffic, from Python sets: each token to each of its unique destination ranks
    once; rows to itself are `*_self`, not wire bytes."""
    row = H * torch.empty((), dtype=case.dtype).element_size()
    dests = [
        [{owner(e, world) for e in row_ids} for row_ids in make_inputs(case, world, r)[1].tolist()]
        for r in range(world)
    ]
    sent = sum(len(d - {rank}) for d in dests[rank])
    own = sum(rank in d for d in dests[rank])
    received = sum(rank in d for s in range(world) if s != rank for d in dests[s])
    return {
        "tokens_sent": sent,
        "tokens_received": received,
        "tokens_self": own,
        "bytes_sent": sent * row,
        "bytes_received": received * row,
        "bytes_self": own * row,
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_counters_equal_floor(ranks, case: Case) -> None:
    world, results = ranks
    for rank, res in enumerate(results):
        want = floor(case, world, rank)
        assert res[case.name]["last"] == want
        assert res[case.name]["total"] == {k: 2 * v for k, v in want.items()}  # two steps
    if case.routing == "dedupe":  # two experts on one rank: the token still travels once
        for rank, res in enumerate(results):
            last = res[case.name]["last"]
            assert last["tokens_sent"] + last["tokens_self"] == case.counts[rank]


def test_dispatcher_setup(ranks) -> None:
    world, results = ranks
    for res in results:
        assert res["backend"] == "AllToAllDispatcher"
        assert f"[0, {world})" in res["bad_e2r_error"]
        assert res["after_reset"] == (0, 0)
        assert res["other_mode_equal"], "a dispatch outside the cases' (inference) mode differs"


def test_local_dispatcher_and_factory() -> None:
    assert not dist.is_initialized()
    assert isinstance(make_dispatcher(), LocalDispatcher)
    with pytest.raises(ValueError, match="all_to_all"):
        make_dispatcher("nccl")
    with pytest.raises(ValueError, match="expert_to_rank"):
        make_dispatcher("all_to_all")
    local = make_dispatcher("local")
    x, ids, w = make_inputs(CASES[0], 2, 0)
    d = local.dispatch(x, ids, w, layer=3)
    assert d.recv_x is x and d.recv_topk_ids is ids and d.recv_topk_weights is w
    out = torch.randn_like(x)
    assert local.combine(out, d.handle) is out
    last = local.counters.last[3]
    assert (last.tokens_self, last.bytes_self, last.bytes_sent) == (len(x), x.numel() * 4, 0)
