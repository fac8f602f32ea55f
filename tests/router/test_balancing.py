"""router/balancing.py: the pure ranking policies, and the Serve request routers' logic driven
directly (no Ray): candidates and pending requests are stand-ins with only the attributes the
routers read (`replica_id.unique_id`, `routing_stats`; `args[0]`, `metadata.internal_request_id`).
"""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace
from typing import Any

from router.balancing import (
    ADMISSION_GRACE_S,
    PREFIX_TOKENS,
    DecodeRequestRouter,
    PrefillRequestRouter,
    RankLoad,
    prefix_key,
    rank_decode,
    rank_prefill,
)
from workers.engine.params import SamplingParams
from workers.messages import DecodeJob, PrefillJob

BLOCK = 16


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


# --- the request routers, without Ray ----------------------------------------------------------
def _replica(rid: str, **stats: int) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats=stats or None)


def _pending(job: Any, internal_id: str) -> Any:
    return SimpleNamespace(args=[job], metadata=SimpleNamespace(internal_request_id=internal_id))


def _router(cls: type) -> Any:
    router: Any = object.__new__(cls)  # skip Serve's __init__ (it wants a live deployment)
    router.initialize_state(block_size=BLOCK)
    return router


def _route(router: Any, replicas: list[Any], pending: Any) -> list[str]:
    groups = asyncio.run(router.choose_replicas(replicas, pending))
    assert all(len(group) == 1 for group in groups)  # one rank per group, best first
    return [group[0].replica_id.unique_id for group in groups]


def _decode(iid: str, prompt_tokens: int = 40) -> Any:
    return _pending(DecodeJob(iid, prompt_tokens, handoff=[]), iid)


def _prefill(iid: str, prompt: list[int]) -> Any:
    return _pending(PrefillJob(iid, prompt, SamplingParams()), iid)


def test_decode_burst_before_a_stats_refresh_spreads_over_idle_replicas():
    router = _router(DecodeRequestRouter)
    idle = dict(kv_blocks_used=0, kv_blocks_total=100, running_requests=0)
    replicas = [_replica(r, **idle) for r in ("r3", "r1", "r0", "r2")]
    firsts = [_route(router, replicas, _decode(f"q{i}"))[0] for i in range(4)]
    assert sorted(firsts) == ["r0", "r1", "r2", "r3"]  # one each, although no stats changed
    assert firsts[0] == "r0"  # all equal: the lowest id
    blocks = math.ceil((40 + 1) / BLOCK)
    assert router._own(replicas) == ({r: blocks for r in firsts}, {r: 1 for r in firsts})


def test_decode_completion_lowers_the_replicas_load_again():
    router = _router(DecodeRequestRouter)
    replicas = [_replica(r) for r in ("r0", "r1")]  # no report yet at all
    assert _route(router, replicas, _decode("q0"))[0] == "r0"
    assert _route(router, replicas, _decode("q1"))[0] == "r1"
    assert _route(router, replicas, _decode("q2", prompt_tokens=400))[0] == "r0"
    # r0 now carries two requests, r1 one: the next goes to r1 ...
    assert _route(router, replicas, _decode("probe"))[0] == "r1"
    router.on_request_completed("r1", "probe")
    # ... until r0's requests finish: then r0 is the lighter one again
    router.on_request_completed("r0", "q0")
    router.on_request_completed("r0", "q2")
    assert _route(router, replicas, _decode("q3"))[0] == "r0"
    router.on_request_completed("r0", "unknown")  # unknown ids are ignored
    assert set(router._inflight) == {"q1", "q3"}


def test_decode_replica_reporting_higher_kv_usage_is_ranked_last():
    router = _router(DecodeRequestRouter)
    replicas = [
        _replica("r0", kv_blocks_used=90, kv_blocks_total=100, running_requests=1),
        _replica("r1", kv_blocks_used=10, kv_blocks_total=100, running_requests=8),
        _replica("r2", kv_blocks_used=10, kv_blocks_total=100, running_requests=2),
    ]
    assert _route(router, replicas, None) == ["r2", "r1", "r0"]  # no pending: nothing recorded
    assert router._inflight == {}


def test_prefill_routes_an_identical_prefix_back_to_the_same_replica_on_a_tie():
    router = _router(PrefillRequestRouter)
    replicas = [_replica(r, queued_prompt_tokens=0) for r in ("r0", "r1", "r2")]
    shared = list(range(PREFIX_TOKENS))
    # make r1 the one that took the prefix: r0 is busy (reported) while the first one routes
    busy_r0 = [_replica("r0", queued_prompt_tokens=500), *replicas[1:]]
    assert _route(router, busy_r0, _prefill("a", shared + [1]))[0] == "r1"
    router.on_request_completed("r1", "a")
    # all tied again (idle): the same prefix goes back to r1 rather than to the lowest id r0 ...
    assert _route(router, replicas, _prefill("b", shared + [2, 3]))[0] == "r1"
    router.on_request_completed("r1", "b")
    # ... while a different prefix falls back to the id order
    assert _route(router, replicas, _prefill("c", [7] + shared))[0] == "r0"


def test_prefill_affinity_never_beats_a_lighter_replica():
    router = _router(PrefillRequestRouter)
    replicas = [_replica(r) for r in ("r0", "r1")]
    prompt = list(range(64))
    assert _route(router, replicas, _prefill("a", prompt))[0] == "r0"
    # "a" is still in flight on r0 (64 tokens): the same prefix now goes to the idle r1
    assert _route(router, replicas, _prefill("b", prompt))[0] == "r1"
    assert router._own(replicas)[0] == {"r0": 64, "r1": 64}


def test_prefill_in_flight_tokens_count_until_completed():
    router = _router(PrefillRequestRouter)
    replicas = [_replica("r0"), _replica("r1")]
    assert _route(router, replicas, _prefill("big", [1] * 1000))[0] == "r0"
    assert _route(router, replicas, _prefill("s1", [2] * 10))[0] == "r1"
    assert _route(router, replicas, _prefill("s2", [3] * 10))[0] == "r1"  # 10 < 1000
    router.on_request_completed("r0", "big")
    assert _route(router, replicas, _prefill("s3", [4] * 10))[0] == "r0"


def test_prefill_burst_on_busy_replicas_spreads():
    router = _router(PrefillRequestRouter)
    replicas = [
        _replica("r0", queued_prompt_tokens=1000),
        _replica("r1", queued_prompt_tokens=1200),
    ]
    firsts = [_route(router, replicas, _prefill(f"q{i}", [i] * 100))[0] for i in range(4)]
    # r0 + 300 tokens already exceeds r1's 1200: at least the last of the burst goes to r1
    assert firsts.count("r0") < 4


def test_work_already_in_a_report_is_not_counted_twice():
    """A request routed well before a rank's report (more than the admission grace) is in that
    report and is not added again; one routed just before the report still counts."""
    router = _router(PrefillRequestRouter)
    idle = [_replica("r0"), _replica("r1")]
    assert _route(router, idle, _prefill("a", [1] * 100))[0] == "r0"
    soon = time.time() + 0.1  # a report right after routing may not show the request yet
    assert router._own([_replica("r0", time_s=soon), _replica("r1", time_s=soon)])[0] == {"r0": 100}
    # r0 reports well after that routing: its 100 queued tokens are in the stats
    later = time.time() + ADMISSION_GRACE_S + 1
    reported = [
        _replica("r0", queued_prompt_tokens=100, time_s=later),
        _replica("r1", queued_prompt_tokens=0, time_s=later),
    ]
    assert router._own(reported) == ({}, {})
    assert _route(router, reported, _prefill("b", [2] * 50))[0] == "r1"
