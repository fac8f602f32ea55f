"""An EP group re-places its experts from observed load mid-generation (EPLB, weights moved
between the Ray actors) and must still give exactly the greedy tokens of one rank; the load
statistics it rebalances from must count every routed pick of every rank's own tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.ep_offline import ExpertParallelGroup
from cluster.offline import PromptSpec, run_offline
from tests.conftest import read_config
from workers.engine import InvalidRequestError, SamplingParams
from workers.engine.build import build_engine
from workers.ep_rank import resolve_backend
from workers.moe.placement import Placement, contiguous_placement

pytestmark = pytest.mark.timeout(120)

MAX_TOKENS = 12
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
NUM_REDUNDANT = 2  # mixtral: 8 experts + 2 copies = 10 slots, 5 per rank


def _specs(n: int = 6) -> list[PromptSpec]:
    gen = torch.Generator().manual_seed(5)
    return [
        PromptSpec(f"p{i}", torch.randint(3, 400, (3 + 4 * i,), generator=gen).tolist(), PARAMS)
        for i in range(n)
    ]


def test_rebalance_mid_generation_keeps_single_rank_tokens(tiny_checkpoint) -> None:
    path = tiny_checkpoint("mixtral")
    config = read_config(path)
    specs = _specs()
    reference = [o.token_ids for o in run_offline(build_engine(path), specs)]
    start = contiguous_placement(config["num_local_experts"], 2, NUM_REDUNDANT)
    with ExpertParallelGroup(
        path, 2, timeout_s=90, num_redundant=NUM_REDUNDANT, load_window=1000
    ) as group:
        outs = group.generate(specs, rebalance_every=4)
        assert [o.token_ids for o in outs] == reference, "tokens changed by the rebalance"

        placements = group.call("placements")
        assert placements[0] == placements[1], "ranks disagree on the placement"
        moved = [p for p in placements[0] if p != start]
        assert moved, "no MoE layer was re-placed"
        reports = group.call("rebalance_reports")
        assert reports[0] == reports[1] and [r.step for r in reports[0]] == [4, 8, 12]
        for r in reports[0]:  # a layer only moves when its hottest rank gets lighter
            for before, after in zip(r.max_rank_load_before, r.max_rank_load_after, strict=True):
                assert after <= before
        assert sum(r.rows_moved for r in reports[0]) > 0

        # every forward token's top-k picks, counted once, on the rank that owns the token
        loads = group.call("expert_load")  # per rank [L, E]
        layers = config["num_hidden_layers"]
        assert all(load.shape == (layers, config["num_local_experts"]) for load in loads)
        assert all(int(load.sum()) > 0 for load in loads)
        forwarded = sum(len(s.prompt) + MAX_TOKENS - 1 for s in specs)
        assert int(sum(loads).sum()) == forwarded * config["num_experts_per_tok"] * layers
        for r, load in enumerate(loads):  # the window covers the whole run: exact per rank
            mine = sum(len(s.prompt) + MAX_TOKENS - 1 for s in specs[r::2])
            assert (load.sum(-1) == mine * config["num_experts_per_tok"]).all()

        # a placement given directly, then a run without rebalancing: the same tokens again
        slots = list(range(8)) + [7, 7]
        direct = [Placement(8, 2, tuple(reversed(slots)))] * layers
        rows = group.call("apply_placements", direct)
        assert rows[0] == rows[1] > 0
        assert group.call("placements") == [direct, direct]
        again = group.generate(specs)
        assert [o.token_ids for o in again] == reference


def test_engine_opens_one_load_step_per_forward(tiny_checkpoint) -> None:
    path = tiny_checkpoint("qwen3_moe")  # layer 1 is dense: 2 MoE layers of 3
    config = read_config(path)
    engine = build_engine(path)
    load = engine.model.track_expert_load(window=2)
    assert load.totals().shape == (2, config["num_local_experts"])
    prompt = list(range(5, 12))
    engine.add_request("a", SamplingParams(max_tokens=4, temperature=0), prompt_token_ids=prompt)
    engine.step()  # the prompt: 7 tokens
    assert int(load.totals().sum()) == 7 * config["num_experts_per_tok"] * 2
    engine.step()
    engine.step()  # two decodes: the prompt's step has left the 2-step window
    assert int(load.totals().sum()) == 2 * config["num_experts_per_tok"] * 2
    assert load.num_steps == 3


def test_backend_choice() -> None:
    assert resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("gloo", "cpu") == "gloo"
    if not torch.cuda.is_available():
        assert resolve_backend("auto", "cuda") == "gloo"
        with pytest.raises(ValueError, match="needs the model on an available CUDA device"):
            resolve_backend("nccl", "cuda")
    else:
        assert resolve_backend("auto", "cuda") == "nccl"
    with pytest.raises(ValueError, match="use backend='gloo' or 'auto' on CPU"):
        resolve_backend("nccl", "cpu")
    with pytest.raises(ValueError, match="choose one of 'auto', 'gloo', 'nccl'"):
        resolve_backend("mpi", "cpu")
    with pytest.raises(InvalidRequestError, match="choose one of"):
        ExpertParallelGroup(Path(__file__), 2, backend="ucc")
