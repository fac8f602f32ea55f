"""`Rank` alone (no channel): a stopping loop answers every request it holds or has queued,
drain refuses new work and hands back what outlives the grace, a bad submit is answered."""

from __future__ import annotations

import json
import queue
import time

import pytest

from workers.engine import SamplingParams
from workers.engine.build import build_engine
from workers.messages import DRAINING, INVALID, MIGRATE, Submit
from workers.rank import GangMember, Rank
from workers.rank.rank import STATUS_PERIOD_S

LONG = SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True)
WAIT_S = 60


@pytest.fixture
def rank(tiny_checkpoint):
    r = Rank(build_engine(tiny_checkpoint("qwen3_moe")), GangMember("decode", "g", 0, 1, "r0"))
    published: queue.SimpleQueue = queue.SimpleQueue()
    r.publish = lambda by_session, load, admitted: published.put(by_session.get("s", []))
    r.published = published  # type: ignore[attr-defined]
    yield r.start()
    r.stop(10)


def _until(rank, pred) -> dict:
    seen: dict = {}
    while True:
        for d in rank.published.get(timeout=WAIT_S):
            seen.setdefault(d.request_id, []).append(d)
        if pred(seen):
            return seen


def test_stop_hands_back_every_request_held_or_queued(rank):
    for i in range(3):
        rank.submit("s", Submit(f"a{i}", [5, 6, 7 + i], LONG))
    _until(rank, lambda seen: len(seen) == 3)  # all three are streaming
    rank.submit("s", Submit("late", [9, 9], LONG))  # may still sit in the inbox
    rank.stop(WAIT_S)
    seen = _until(
        rank,
        lambda s: all(
            s.get(r, [None])[-1] and s[r][-1].finished for r in ("a0", "a1", "a2", "late")
        ),
    )
    for rid in ("a0", "a1", "a2", "late"):
        assert seen[rid][-1].error_kind == MIGRATE, rid
    assert rank.engine.stats().kv_blocks_used == 0 and rank.engine.stats().num_requests == 0


def test_drain_refuses_new_work_and_hands_back_after_the_grace(rank):
    rank.submit("s", Submit("held", [5, 6, 7], LONG))
    _until(rank, lambda seen: "held" in seen)
    rank.drain(grace_s=0.3)
    rank.submit("s", Submit("new", [5, 6, 8], LONG))
    seen = _until(rank, lambda s: "new" in s and s["held"][-1].finished)
    assert seen["new"][-1].error_kind == DRAINING
    assert seen["held"][-1].error_kind == MIGRATE
    assert not rank.snapshot.load.accepting


def test_an_idle_rank_alone_sleeps_until_woken_but_refreshes_its_status(rank):
    """No peers to poll: idle, the loop waits up to the status period (not the gang's 50 ms);
    a submit still wakes it at once, and the status keeps being refreshed."""
    deadline = time.monotonic() + WAIT_S
    while rank._backoff.current < STATUS_PERIOD_S:
        assert time.monotonic() < deadline, f"idle backoff stuck at {rank._backoff.current}"
        time.sleep(0.05)
    first = rank.snapshot.status.time_s
    while rank.snapshot.status.time_s == first:
        assert time.monotonic() < deadline, "the idle rank stopped refreshing its status"
        time.sleep(0.05)
    rank.submit("s", Submit("ok", [1, 2], SamplingParams(max_tokens=3, temperature=0)))
    assert _until(rank, lambda s: "ok" in s and s["ok"][-1].finished)["ok"][-1].finished


def test_bad_submit_is_answered_and_the_loop_goes_on(rank):
    rank.submit("s", Submit("bad", [10**7], LONG))
    rank.submit("s", Submit("ok", [1, 2], SamplingParams(max_tokens=3, temperature=0)))
    seen = _until(rank, lambda s: "ok" in s and s["ok"][-1].finished)
    assert seen["bad"][-1].error_kind == INVALID and "vocabulary" in seen["bad"][-1].error
    assert seen["ok"][-1].finish_reason in ("length", "stop")


def test_step_trace_writes_one_line_per_step(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_STEP_TRACE", str(tmp_path))
    r = Rank(build_engine(tiny_checkpoint("qwen3_moe")), GangMember("prefill", "g", 1, 2, "r1"))
    published: queue.SimpleQueue = queue.SimpleQueue()
    r.publish = lambda by_session, load, admitted: published.put(by_session.get("s", []))
    r.published = published  # type: ignore[attr-defined]
    r.start()
    try:
        r.submit("s", Submit("t", [5, 6, 7, 8], SamplingParams(max_tokens=3, temperature=0)))
        _until(r, lambda s: "t" in s and s["t"][-1].finished)
    finally:
        r.stop(10)
    lines = [json.loads(x) for x in (tmp_path / "prefill-g-1.jsonl").read_text().splitlines()]
    batches = [line["batch"] for line in lines if line["batch"]]
    assert batches == [[["t", 0, 4]], [["t", 4, 1]], [["t", 5, 1]]]
    assert all(line["dur"] >= 0 for line in lines)
