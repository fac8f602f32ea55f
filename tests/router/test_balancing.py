"""router/balancing.py: the pure ranking policies."""

from __future__ import annotations

from router.balancing import PREFIX_TOKENS, RankLoad, prefix_key, rank_decode, rank_prefill


# --- pure policies ------------------------------------------------------------------------------
def test_rank_prefill_fewest_queued_tokens_first():
    loads = [RankLoad("a", queued_prompt_tokens=300), RankLoad("b", 100), RankLoad("c", 200)]
    assert rank_prefill(loads) == ["b", "c", "a"]
    # affinity only breaks ties: a busier rank is not preferred for sharing the prefix
    assert rank_prefill(loads, affinity="a") == ["b", "c", "a"]


def test_rank_prefill_ties_go_to_affinity_then_lower_id():
    loads = [RankLoad("c", 50), RankLoad("b", 50), RankLoad("a", 50), RankLoad("d", 10)]
    assert rank_prefill(loads) == ["d", "a", "b", "c"]
    assert rank_prefill(loads, affinity="c") == ["d", "c", "a", "b"]
    assert rank_prefill(loads, affinity="gone") == ["d", "a", "b", "c"]  # unknown: no effect
    assert rank_prefill([]) == []


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


def test_prefix_key_is_the_first_prefix_tokens():
    long = list(range(100))
    assert prefix_key(long) == tuple(range(PREFIX_TOKENS))
    assert prefix_key(long) == prefix_key(long[:PREFIX_TOKENS] + [-1] * 5)  # tail ignored
    assert prefix_key(long) != prefix_key([999] + long[1:])
    assert prefix_key([1, 2, 3]) == (1, 2, 3)  # shorter prompts: the whole prompt
    assert prefix_key([]) == ()
