"""router/balancing.py: the pure ranking policies."""

from __future__ import annotations

from router.balancing import RankLoad, cached_tokens, prefill_cost, rank_decode, rank_prefill
from workers.engine.block_hash import cache_salt, prompt_marks


# --- pure policies ------------------------------------------------------------------------------
def test_rank_prefill_fewest_queued_tokens_first():
    loads = [RankLoad("a", queued_prompt_tokens=300), RankLoad("b", 100), RankLoad("c", 200)]
    assert rank_prefill(loads) == ["b", "c", "a"]
    assert rank_prefill(loads, prompt_tokens=500) == ["b", "c", "a"]  # same prompt everywhere
    assert rank_prefill([]) == []


def test_rank_prefill_trades_cached_tokens_against_queued_ones():
    """cost = queued + prompt - cached: a rank holding 1,024 of a 1,088-token prompt wins
    until its queue is 1,024 tokens longer than the other's."""
    cached = {"warm": 1024}
    for queued, winner in ((0, "warm"), (500, "warm"), (1023, "warm"), (1025, "cold")):
        loads = [RankLoad("warm", queued_prompt_tokens=queued), RankLoad("cold", 0)]
        assert rank_prefill(loads, 1088, cached)[0] == winner, queued
        costs = {r.key: prefill_cost(r, 1088, cached.get(r.key, 0)) for r in loads}
        assert costs == {"warm": queued + 64, "cold": 1088}
    tie = [RankLoad("b", 1024), RankLoad("a", 0)]
    assert rank_prefill(tie, 1088, {"b": 1024}) == ["b", "a"]  # equal cost: more cached first
    assert rank_prefill([RankLoad("c", 5), RankLoad("a", 5)], 10) == ["a", "c"]  # then id


def test_cached_tokens_is_the_deepest_mark_held():
    marks = [(16, 11), (32, 22), (64, 44), (128, 88)]
    assert cached_tokens(marks, {22, 44}) == 64
    assert cached_tokens(marks, set(), {88}) == 128  # any of several holders
    assert cached_tokens(marks, {99}) == 0 and cached_tokens([], {11}) == 0


def test_prompt_marks_are_shared_prefixes_at_summary_depths():
    salt = cache_salt("m")
    system = list(range(1000, 1000 + 1024))
    a = prompt_marks(system + [1] * 64, 16, salt)
    b = prompt_marks(system + [2] * 64, 16, salt)
    assert [t for t, _ in a] == [16, 32, 64, 128, 256, 512, 768, 1024]  # 1,088 tokens
    assert a == b  # the 64-token tails end inside block 67, past the last mark at depth 64
    assert prompt_marks(system[:17], 16, salt) == a[:1]  # the last token is never cached
    assert prompt_marks(system[:16], 16, salt) == []
    assert not set(a) & set(prompt_marks([7] + system[1:], 16, salt))  # chained


def test_rank_decode_kv_usage_then_running_then_id():
    loads = [
        RankLoad("a", kv_blocks_used=50, kv_blocks_total=100, running_requests=1),  # 0.5
        RankLoad("b", kv_blocks_used=10, kv_blocks_total=10, running_requests=0),  # 1.0
        RankLoad("c", kv_blocks_used=20, kv_blocks_total=100, running_requests=9),  # 0.2
        RankLoad("d", kv_blocks_used=2, kv_blocks_total=10, running_requests=3),  # 0.2
        RankLoad("e", kv_blocks_used=2, kv_blocks_total=10, running_requests=3),  # 0.2
    ]
    # usage is a fraction (b's 10 blocks are its whole cache, a's 50 are half of it)
    assert rank_decode(loads) == ["d", "e", "c", "a", "b"]
    assert RankLoad("x", kv_blocks_used=3, kv_blocks_total=0).kv_usage == 3.0  # no div by 0
