"""Resuming a request elsewhere (a rank died mid-stream): the engine continues after the tokens
already streamed, and the concatenated stream equals an uninterrupted run. One request's
failure in the step's tail (sampling, stop handling, detokenization) ends that request only."""

from __future__ import annotations

import pytest
import torch

from workers.engine import Resume, SamplingParams
from workers.engine.build import build_engine


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def ckpt(request, tiny_checkpoint):
    return tiny_checkpoint(request.param)


def _stream(engine, rid: str) -> list:
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=("ab", "q r")),
    ],
    ids=["greedy", "seeded", "stop-strings"],
)
@pytest.mark.parametrize("cut", [1, 9])
def test_resumed_stream_equals_an_uninterrupted_one(ckpt, params, cut):
    prompt = torch.randint(3, 500, (19,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = _stream(_started(ckpt, prompt, params), "r")
    first = _started(ckpt, prompt, params)
    delivered = []
    while first.has_unfinished() and sum(len(o.new_token_ids) for o in delivered) < cut:
        delivered += first.step()
    if delivered[-1].finished:
        pytest.skip("finished before the cut")
    ids = [t for o in delivered for t in o.new_token_ids]
    chars = sum(len(o.new_text) for o in delivered)
    second = build_engine(ckpt)  # a different rank: nothing of the first one's state
    second.add_request("r", params, prompt_token_ids=prompt, resume=Resume(ids, chars))
    rest = _stream(second, "r")
    assert ids + [t for o in rest for t in o.new_token_ids] == ref[-1].token_ids
    text = "".join(o.new_text for o in delivered + rest)
    assert text == "".join(o.new_text for o in ref) == ref[-1].text
    assert rest[-1].finish_reason == ref[-1].finish_reason
    assert second.stats().kv_blocks_used == 0


def _started(ckpt, prompt, params):
    engine = build_engine(ckpt)
    engine.add_request("r", params, prompt_token_ids=prompt)
    return engine


class _Brittle:
    """A tokenizer that breaks on one token id (a detokenizer bug hitting one request)."""

    def __init__(self, inner, bad: int) -> None:
        self.inner, self.bad = inner, bad

    def decode(self, ids, **kw):
        if self.bad in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return self.inner.decode(ids, **kw)

    def encode(self, *a, **kw):
        return self.inner.encode(*a, **kw)


def test_a_failing_request_ends_alone(ckpt):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = build_engine(ckpt)
    ok_ref = build_engine(ckpt).generate([([5, 6, 7], params)])[0]
    victim = engine.generate([([40, 41, 42, 43], params)])[0]
    engine.tokenizer = _Brittle(engine.tokenizer, victim.token_ids[3])
    assert victim.token_ids[3] not in ok_ref.token_ids, "pick prompts whose outputs differ"
    engine.add_request("victim", params, prompt_token_ids=[40, 41, 42, 43])
    engine.add_request("ok", params, prompt_token_ids=[5, 6, 7])
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert (
        final["victim"].finish_reason == "error" and "UnicodeDecodeError" in final["victim"].error
    )
    assert final["ok"].token_ids == ok_ref.token_ids and final["ok"].finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0 and engine.stats().num_requests == 0
