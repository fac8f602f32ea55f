"""Prefix caching: outputs with the cache equal outputs without it (fp32, greedy, every
architecture), shared blocks are never overwritten or evicted while in use, and KV accounting
returns to the cached-only baseline."""

from __future__ import annotations

import pytest
import torch

from workers.engine import EngineConfig, SamplingParams, SchedulerConfig
from workers.engine.block_hash import block_hashes, cache_salt
from workers.engine.block_manager import BlockManager
from workers.engine.build import build_engine
from workers.engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
BS = 4  # tokens per block in these tests: prefixes end mid-block and on a boundary


def _tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=gen).tolist()


def _shared_prefix_prompts() -> list[list[int]]:
    """Prompts over two prefixes: 10 tokens (ends mid-block) and 12 (ends on a block edge),
    with tails of 0-7 tokens; one prompt is exactly the 12-token prefix."""
    mid, edge = _tokens(10, 1), _tokens(12, 2)
    return [
        mid + _tokens(3, 3),
        edge + _tokens(5, 4),
        mid + _tokens(7, 5),
        edge,
        edge + _tokens(1, 6),
        mid + _tokens(2, 7),
    ]


def _seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, GREEDY, arrival=0)


# --- the block manager alone ------------------------------------------------------------------
def test_hashes_chain_over_every_earlier_token():
    salt = cache_salt("m")
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, salt)
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4, salt)
    assert len(a) == 2 and len(b) == 2  # full blocks only
    assert a[0] != b[0] and a[1] != b[1]  # block 2 differs because block 1 does
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, cache_salt("other")) != a
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9], 4, salt, known=a)[:2] == a


def _filled(bm: BlockManager, tokens: list[int], rid: str = "r") -> Sequence:
    """A sequence admitted like the scheduler does, with all its tokens computed."""
    seq = _seq(tokens, rid)
    bm.take_cached(seq)
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed = seq.num_tokens
    bm.commit(seq)
    return seq


def test_a_cached_chain_is_shared_and_the_last_token_is_always_computed():
    bm = BlockManager(16, 4, prefix_caching=True)
    first = _filled(bm, list(range(10)))  # 2 full blocks registered, 1 partial
    assert bm.num_cached == 2 and bm.num_used == 3
    second = _seq(list(range(9)) + [99, 98])
    assert bm.take_cached(second) == 8
    assert second.block_table == first.block_table[:2]
    same = _seq(list(range(8)))  # all 8 tokens cached, but one must run to give logits
    assert bm.take_cached(same) == 4
    bm.free(first)
    bm.free(second)
    bm.free(same)
    assert bm.num_used == 0 and bm.num_cached == 2 and bm.num_free == 16


def test_eviction_takes_uncached_blocks_first_then_least_recently_released():
    bm = BlockManager(4, 2, prefix_caching=True)
    a = _filled(bm, [1, 2, 3, 4])  # blocks 0, 1 cached
    bm.free(a)
    b = _filled(bm, [5, 6, 7])  # takes the uncached 2, 3; [5, 6] cached in block 2
    assert bm.num_cached == 3 and bm.num_evictions == 0
    c = _seq([8, 9, 10])
    bm.allocate(c, 3)  # needs 2 blocks: both of a's, its tail first
    assert bm.num_evictions == 2 and sorted(c.block_table) == [0, 1]
    assert bm.take_cached(_seq([1, 2, 3, 4, 5])) == 0  # a's chain is gone
    assert not bm.can_allocate(_seq([0]), 1)  # b's blocks are in use: never evicted
    bm.free(b)
    bm.free(c)
    assert bm.num_used == 0 and bm.num_cached == 1


def test_caching_off_shares_nothing():
    bm = BlockManager(8, 4)
    _filled(bm, list(range(9)))
    assert bm.take_cached(_seq(list(range(9)))) == 0 and bm.num_cached == 0


# --- the engine, token-exact against the engine without a cache -----------------------------
def _engine(path, caching: bool, **kw):
    sched = SchedulerConfig(max_num_batched_tokens=kw.pop("budget", 16))
    config = EngineConfig(block_size=BS, prefix_caching=caching, scheduler=sched, **kw)
    return build_engine(path, config=config)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_cached_prefixes_give_the_same_tokens(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    prompts = _shared_prefix_prompts()
    requests = [(p, GREEDY) for p in prompts]
    reference = [o.token_ids for o in _engine(path, False).generate(requests)]
    assert len({tuple(t) for t in reference}) == len(prompts), "outputs must tell prompts apart"

    engine = _engine(path, True)
    assert [o.token_ids for o in engine.generate(requests)] == reference  # one batch
    one_batch = engine.stats()
    assert one_batch.prefix_hit_tokens > 0, "later chunks of the batch reuse earlier prompts"
    assert [o.token_ids for o in engine.generate(requests)] == reference  # across batches
    again = engine.stats()
    hits = again.prefix_hit_tokens - one_batch.prefix_hit_tokens
    # every prompt's full blocks are cached now, except the last token's block
    assert hits == sum((len(p) - 1) // BS * BS for p in prompts)
    computed = again.num_tokens_processed - one_batch.num_tokens_processed
    assert computed == one_batch.num_tokens_processed - hits + one_batch.prefix_hit_tokens
    assert again.kv_blocks_used == 0 and again.kv_blocks_cached > 0


def test_preemption_with_a_cache_keeps_outputs(tiny_checkpoint):
    path = tiny_checkpoint("deepseek_v3")
    prompts = _shared_prefix_prompts()
    requests = [(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)) for p in prompts]
    reference = [o.token_ids for o in _engine(path, False).generate(requests)]
    tight = _engine(path, True, num_kv_blocks=14)
    assert [o.token_ids for o in tight.generate(requests)] == reference
    stats = tight.stats()
    assert stats.num_preemptions > 0, "cache was not tight enough to preempt"
    assert stats.prefix_evictions > 0, "cache was not tight enough to evict"
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_cached <= stats.kv_blocks_total


def test_eviction_under_pressure_keeps_outputs_exact(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    prompts = [_tokens(9, 100 + i) + _tokens(3, i) for i in range(6)]
    prompts += [p[:9] + _tokens(4, 50 + i) for i, p in enumerate(prompts)]  # reuse, if still held
    reference = [o.token_ids for o in _engine(path, False).generate([(p, GREEDY) for p in prompts])]
    engine = _engine(path, True, num_kv_blocks=12)
    outs = []
    for p in prompts:  # one at a time: each may evict what the previous ones left cached
        outs += engine.generate([(p, GREEDY)])
    assert [o.token_ids for o in outs] == reference
    stats = engine.stats()
    assert stats.prefix_evictions > 0 and stats.kv_blocks_used == 0


def test_abort_never_leaks_a_shared_block(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("mixtral"), True)
    prefix = _tokens(12, 9)
    engine.generate([(prefix + [7], GREEDY)])
    baseline = engine.stats()
    for i in range(4):
        engine.add_request(f"a{i}", GREEDY, prompt_token_ids=prefix + _tokens(6, i))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    assert engine.stats().prefix_hit_tokens - baseline.prefix_hit_tokens >= 4 * 12
    for i in range(4):
        assert engine.abort(f"a{i}")
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    assert stats.kv_blocks_cached >= baseline.kv_blocks_cached


def test_a_prefix_shared_within_one_batch_is_computed_once(tiny_checkpoint):
    """Five prompts arrive together with one 12-token prefix: the first computes it, the others
    wait for its blocks instead of computing them again, then compute only their own 3 tokens."""
    path = tiny_checkpoint("qwen3_moe")
    prefix = _tokens(12, 21)
    prompts = [prefix + _tokens(3, 30 + i) for i in range(5)]
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    reference = _engine(path, False, budget=64).generate([(p, first) for p in prompts])
    engine = _engine(path, True, budget=64)
    outs = engine.generate([(p, first) for p in prompts])
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    stats = engine.stats()
    assert stats.num_tokens_processed == 15 + 4 * 3  # one prefix, five tails
    assert stats.prefix_hit_tokens == 4 * 12 and stats.kv_blocks_used == 0
