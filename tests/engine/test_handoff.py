"""Prefill on one engine, decode on another: the handed-over KV continues exactly where a single
engine would (disaggregated prefill/decode without the cluster around it)."""

from __future__ import annotations

import pytest
import torch

from workers.engine import EngineConfig, SamplingParams
from workers.engine.build import build_engine


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def ckpt(request, tiny_checkpoint):
    return tiny_checkpoint(request.param)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(9)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (4, 17, 33)]


def _disaggregated(ckpt, prompts, params, decode_config=None):
    prefill, decode = build_engine(ckpt), build_engine(ckpt, config=decode_config)
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", params, prompt_token_ids=p, prefill_only=True)
    first = {}
    while prefill.has_unfinished():
        for out in prefill.step():
            assert out.finished and out.finish_reason == "handoff" and out.handoff is not None
            assert out.new_token_ids == [out.handoff.first_token]
            first[out.request_id] = out
            decode.add_prefilled(out.handoff)
    final = {}
    while decode.has_unfinished():
        for out in decode.step():
            assert out.handoff is None
            if out.finished:
                final[out.request_id] = out
    assert prefill.stats().kv_blocks_used == 0 and decode.stats().kv_blocks_used == 0
    return [(first[f"r{i}"], final[f"r{i}"]) for i in range(len(prompts))], decode


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_handoff_continues_like_one_engine(ckpt, params):
    prompts = _prompts()
    single = build_engine(ckpt).generate([(p, params) for p in prompts])
    pairs, _ = _disaggregated(ckpt, prompts, params)
    for (first, last), ref in zip(pairs, single, strict=True):
        assert last.token_ids == ref.token_ids
        assert last.text == ref.text and ref.text.startswith(first.new_text)
        assert last.finish_reason == ref.finish_reason == "length"


def test_handoff_without_free_blocks_recomputes_on_the_decode_rank(ckpt):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = _prompts()
    single = build_engine(ckpt).generate([(p, params) for p in prompts])
    tight = EngineConfig(block_size=4, num_kv_blocks=16)  # cannot hold all three at once
    pairs, _ = _disaggregated(ckpt, prompts, params, decode_config=tight)
    assert [last.token_ids for _, last in pairs] == [o.token_ids for o in single]


def test_handoff_is_small_for_mla(tiny_checkpoint):
    engine = build_engine(tiny_checkpoint("deepseek_v3"))
    engine.add_request(
        "a",
        SamplingParams(max_tokens=4, temperature=0),
        prompt_token_ids=[5] * 10,
        prefill_only=True,
    )
    out = engine.step()[0]
    assert out.handoff is not None
    per_token = out.handoff.num_bytes // (10 * engine.model.num_layers)
    assert per_token == 4 * engine.model.kv_token_shape[0]  # latent + rope key, fp32


def test_decode_rank_shares_prompt_blocks_it_already_holds(ckpt):
    """Two handoffs with one 12-token prefix (3 blocks of 4): the second shares the decode
    rank's copy of those blocks instead of writing its own, and decodes exactly."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 500, (12,), generator=gen).tolist()
    prompts = [prefix + [7, 8, 9], prefix + [10, 11]]
    single = build_engine(ckpt).generate([(p, params) for p in prompts])
    roomy = EngineConfig(block_size=4)
    pairs, decode = _disaggregated(ckpt, prompts, params, decode_config=roomy)
    assert [last.token_ids for _, last in pairs] == [o.token_ids for o in single]
    stats = decode.stats()
    assert stats.prefix_hit_tokens == 12, "the second prompt's 3 prefix blocks were shared"
    assert stats.prefix_query_tokens == sum(len(p) for p in prompts)
