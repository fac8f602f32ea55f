"""Scheduler and block manager decisions on plain sequences (no model)."""

import pytest

from workers.engine.block_manager import BlockManager
from workers.engine.params import QueueFullError, SamplingParams
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import Sequence, SequenceStatus


def _seq(i: int, n: int) -> Sequence:
    return Sequence(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=4), arrival=i)


def _run_step(sched: Scheduler) -> dict[str, int]:
    """Schedule, then pretend the model ran: advance and sample a token where due."""
    batch = sched.schedule()
    for b in batch:
        samples = b.samples
        b.seq.num_computed += b.num_new
        if samples:
            b.seq.output_token_ids.append(7)
    return {b.seq.request_id: b.num_new for b in batch}


def test_chunked_prefill_respects_token_budget_and_decodes_join():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(64, 4))
    sched.add(_seq(0, 3))
    assert _run_step(sched) == {"r0": 3}
    sched.add(_seq(1, 20))  # long prompt arrives while r0 decodes
    assert _run_step(sched) == {"r0": 1, "r1": 7}
    assert _run_step(sched) == {"r0": 1, "r1": 7}
    assert _run_step(sched) == {"r0": 1, "r1": 6}  # last chunk; r1 samples now
    assert _run_step(sched) == {"r0": 1, "r1": 1}


def test_preemption_frees_blocks_and_recomputes_newest():
    blocks = BlockManager(4, 4)  # 16 token slots in all
    sched = Scheduler(SchedulerConfig(), blocks)
    sched.add(_seq(0, 7))
    sched.add(_seq(1, 7))
    assert _run_step(sched) == {"r0": 7, "r1": 7}
    assert blocks.num_free == 0
    _run_step(sched)  # both decode in their second block: fits (8 tokens each)
    step = _run_step(sched)  # 9th token needs a 3rd block: the newest (r1) is preempted
    assert step == {"r0": 1}
    r1 = sched.waiting[0]
    assert r1.request_id == "r1" and r1.status is SequenceStatus.WAITING and r1.num_computed == 0
    assert r1.block_table == [] and sched.num_preemptions == 1
    assert blocks.num_used == 3


def test_finish_returns_every_block():
    blocks = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(), blocks)
    seqs = [_seq(i, 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _run_step(sched)
    assert blocks.num_used == 6
    for s in seqs:
        sched.finish(s, "stop")
    assert blocks.num_used == 0 and sched.num_unfinished == 0
    assert all(s.finish_reason == "stop" for s in seqs)


def test_waiting_queue_is_bounded():
    sched = Scheduler(SchedulerConfig(max_waiting=2), BlockManager(8, 4))
    sched.add(_seq(0, 3))
    sched.add(_seq(1, 3))
    with pytest.raises(QueueFullError, match="full"):
        sched.add(_seq(2, 3))


def test_max_num_seqs_caps_the_batch():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 4))
    for i in range(4):
        sched.add(_seq(i, 2))
    assert set(_run_step(sched)) == {"r0", "r1"}
    assert len(sched.waiting) == 2


def test_queued_prompt_tokens_count_the_rest_of_chunked_prefills():
    """The prefill balancer's signal: waiting prompts plus what chunked prefills still owe."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager(64, 4))
    sched.add(_seq(0, 20))
    sched.add(_seq(1, 5))
    assert sched.num_queued_prompt_tokens == 25
    _run_step(sched)  # r0 computes 8 of 20
    assert sched.num_queued_prompt_tokens == 12 + 5
    _run_step(sched)
    _run_step(sched)  # r0 done (8 + 8 + 4), r1 gets 4 of 5
    assert sched.num_queued_prompt_tokens == 1
    _run_step(sched)
    assert sched.num_queued_prompt_tokens == 0  # both decoding: nothing of a prompt is owed


def test_a_long_prefill_shares_steps_with_the_prompts_behind_it():
    """max_prefill_chunk: while other prompts want the budget, a long prompt takes at most that
    many tokens per step (the budget left over goes to the prompts nearest to done), so short
    prompts of the same burst get their first tokens long before the long prompt is done;
    decodes come first; alone, the long prompt uses the whole budget."""
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=16, max_prefill_chunk=4), BlockManager(256, 4)
    )
    sched.add(_seq(0, 100))
    sched.add(_seq(1, 4))
    sched.add(_seq(2, 4))
    assert _run_step(sched) == {"r0": 8, "r1": 4, "r2": 4}  # both shorts sample this step
    # decodes first; no other prompt: no cap, the long prompt takes the rest of the budget
    assert _run_step(sched) == {"r0": 14, "r1": 1, "r2": 1}
    sched.add(_seq(3, 30))
    assert _run_step(sched) == {"r0": 4, "r1": 1, "r2": 1, "r3": 10}
    assert _run_step(sched) == {"r0": 4, "r1": 1, "r2": 1, "r3": 10}
    assert _run_step(sched) == {"r0": 4, "r1": 1, "r2": 1, "r3": 10}  # r3 samples: 78 to go
    assert sched.running[0].num_computed == 8 + 14 + 3 * 4
    # without the cap the long prompt holds every short one back until it is done
    plain = Scheduler(SchedulerConfig(max_num_batched_tokens=16), BlockManager(256, 4))
    plain.add(_seq(0, 100))
    plain.add(_seq(1, 6))
    assert _run_step(plain) == {"r0": 16}
