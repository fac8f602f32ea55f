"""`--ep N` runs the prompts on N expert-parallel Ray actors (gloo) and must give exactly the
greedy tokens of `--ep 1` (which the parity tests tie to transformers), for every architecture."""

from __future__ import annotations

import pytest
import torch

from cluster.ep_offline import ExpertParallelGroup, run_offline_ep
from cluster.offline import PromptSpec, run_offline
from workers.engine import EngineConfig, InvalidRequestError, SamplingParams, SchedulerConfig
from workers.engine.build import build_engine

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _specs(n: int = 6) -> list[PromptSpec]:
    gen = torch.Generator().manual_seed(3)
    return [
        PromptSpec(f"p{i}", torch.randint(3, 400, (3 + 5 * i,), generator=gen).tolist(), PARAMS)
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_ep_matches_single_rank(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    specs = _specs()
    reference = [o.token_ids for o in run_offline(build_engine(path), specs)]
    for ep in (2, 4):
        outs = run_offline_ep(path, specs, ep, timeout_s=300)
        assert [o.token_ids for o in outs] == reference, f"{name} --ep {ep} diverged"
        assert [o.prompt_token_ids for o in outs] == [s.prompt for s in specs]


def test_prefix_cache_at_ep_2_gives_the_tokens_of_one_rank_without_it(tiny_checkpoint):
    """Attention is data-parallel: each rank caches its own prompts' prefixes (here 9 shared
    tokens, two blocks of 4 and one token in a third) while the MoE layers still exchange every
    computed token; the tokens equal one rank's with no cache."""
    path = tiny_checkpoint("deepseek_v3")
    shared = _specs(3)[2].prompt[:9]
    specs = [PromptSpec(f"s{i}", shared + [50 + i] * (i + 1), PARAMS) for i in range(6)]
    off = EngineConfig(block_size=4, prefix_caching=False)
    reference = [o.token_ids for o in run_offline(build_engine(path, config=off), specs)]
    on = EngineConfig(block_size=4, scheduler=SchedulerConfig(max_num_batched_tokens=8))
    with ExpertParallelGroup(path, 2, timeout_s=300, engine_config=on) as group:
        assert [o.token_ids for o in group.generate(specs)] == reference
        hits = [s.prefix_hit_tokens for s in group.call("engine_stats")]
    assert all(h > 0 for h in hits), f"each rank reuses its own prompts' prefix: {hits}"


def test_both_dispatch_transports_give_the_tokens_of_one_rank(tiny_checkpoint):
    """CPU ranks of one host move their MoE rows through shared memory unless told to use the
    process group's collectives; either way the tokens are one rank's."""
    path = tiny_checkpoint("qwen3_moe")
    specs = _specs(4)
    reference = [o.token_ids for o in run_offline(build_engine(path), specs)]
    with pytest.raises(InvalidRequestError, match="dispatch_transport"):  # before any actor
        ExpertParallelGroup(path, 2, dispatch_transport="nccl")
    for transport, used in (("auto", "shm"), ("collective", "collective")):
        with ExpertParallelGroup(path, 2, timeout_s=300, dispatch_transport=transport) as group:
            assert [o.token_ids for o in group.generate(specs)] == reference, transport
            assert group.call("dispatch_transport") == [used, used]


def test_ep_size_that_does_not_divide_the_experts_uses_redundant_slots(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")  # 8 experts on 3 ranks: 9 slots, expert 0 twice
    specs = _specs(5)
    reference = [o.token_ids for o in run_offline(build_engine(path), specs)]
    assert [o.token_ids for o in run_offline_ep(path, specs, 3, timeout_s=300)] == reference


def test_a_failing_rank_is_one_clear_error(tiny_checkpoint, tmp_path):
    import shutil

    from cluster.ep_offline import GroupError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint("mixtral"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GroupError, match="rank failed") as err:
        run_offline_ep(broken, _specs(2), 2, timeout_s=120)
    assert "Traceback" not in str(err.value)
