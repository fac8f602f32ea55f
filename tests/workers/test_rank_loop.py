"""The rank loop thread: concurrent streams, bad input, cancellation freeing KV, handoff."""

from __future__ import annotations

import asyncio

import pytest

from workers.engine import InvalidRequestError, SamplingParams
from workers.engine.build import build_engine
from workers.rank_loop import RankLoop

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
WAIT_S = 60


@pytest.fixture
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen3_moe")


async def _collect(loop: RankLoop, **kwargs) -> list:
    return [out async for out in loop.generate(**kwargs)]


def test_concurrent_streams_match_offline(ckpt):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [40] * 20]
    offline = build_engine(ckpt).generate([(p, GREEDY) for p in prompts])
    loop = RankLoop(build_engine(ckpt)).start()

    async def main():
        jobs = [_collect(loop, params=GREEDY, prompt_token_ids=p) for p in prompts]
        return await asyncio.wait_for(asyncio.gather(*jobs), WAIT_S)

    try:
        streams = asyncio.run(main())
    finally:
        loop.stop()
    for outs, ref in zip(streams, offline, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == ref.token_ids
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
    assert loop.stats().kv_blocks_used == 0


def test_bad_input_raises_in_the_caller_and_the_loop_keeps_going(ckpt):
    loop = RankLoop(build_engine(ckpt)).start()

    async def main():
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            await _collect(loop, params=GREEDY, prompt_token_ids=[10**7])
        return await _collect(loop, params=GREEDY, prompt_token_ids=[1, 2])

    try:
        outs = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    finally:
        loop.stop()
    assert outs[-1].finish_reason == "length"


def test_cancelled_stream_frees_every_block(ckpt):
    loop = RankLoop(build_engine(ckpt)).start()
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        stream = loop.generate(params=long, prompt_token_ids=[3] * 30)
        first = await stream.__anext__()
        assert loop.stats().kv_blocks_used > 0
        await stream.aclose()  # the client went away
        for _ in range(WAIT_S * 100):
            if loop.stats().kv_blocks_used == 0 and loop.stats().num_running == 0:
                return first
            await asyncio.sleep(0.01)
        raise AssertionError("KV blocks were not freed after cancellation")

    try:
        asyncio.run(asyncio.wait_for(main(), WAIT_S))
    finally:
        loop.stop()


def test_prefill_then_decode_loops_hand_over_kv(ckpt):
    offline = build_engine(ckpt).generate([([7, 8, 9, 10], GREEDY)])[0]
    prefill, decode = RankLoop(build_engine(ckpt)).start(), RankLoop(build_engine(ckpt)).start()

    async def main():
        first = await _collect(
            prefill, params=GREEDY, prompt_token_ids=[7, 8, 9, 10], prefill_only=True
        )
        rest = await _collect(decode, params=GREEDY, handoff=first[-1].handoff)
        return first[-1].new_token_ids + [t for o in rest for t in o.new_token_ids]

    try:
        tokens = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    finally:
        prefill.stop()
        decode.stop()
    assert tokens == offline.token_ids
