"""Engine behaviour on a tiny real checkpoint: batching, KV accounting, sampling, stops, errors."""

from __future__ import annotations

import pytest
import torch

from workers.engine import EngineConfig, InvalidRequestError, SamplingParams, SchedulerConfig
from workers.engine.build import build_engine

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def ckpt(request, tiny_checkpoint):
    return tiny_checkpoint(request.param)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 500, (int(l),), generator=gen).tolist()
        for l in torch.randint(2, 40, (n,), generator=gen)
    ]


def test_batch_invariance(ckpt):
    prompts = _prompts(8)
    batched = build_engine(ckpt).generate([(p, GREEDY) for p in prompts])
    for i in (0, 5):
        alone = build_engine(ckpt).generate([(prompts[i], GREEDY)])[0]
        assert alone.token_ids == batched[i].token_ids


def test_preemption_keeps_outputs_and_frees_every_block(ckpt):
    prompts = _prompts(6, seed=1)
    roomy = build_engine(ckpt, config=EngineConfig(block_size=4)).generate(
        [(p, GREEDY) for p in prompts]
    )
    tight = build_engine(ckpt, config=EngineConfig(block_size=4, num_kv_blocks=24))
    outs = tight.generate([(p, GREEDY) for p in prompts])
    stats = tight.stats()
    assert stats.num_preemptions > 0, "cache was not tight enough to preempt"
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_continuous_batching_admits_new_requests_each_step(ckpt):
    engine = build_engine(ckpt, config=EngineConfig(scheduler=SchedulerConfig()))
    engine.add_request("a", GREEDY, prompt_token_ids=[5, 6, 7])
    engine.step()
    engine.add_request("b", GREEDY, prompt_token_ids=[8, 9])
    step = {o.request_id for o in engine.step()}
    assert step == {"a", "b"}  # b's prefill ran alongside a's decode
    assert engine.abort("a") and engine.abort("b")
    assert engine.stats().kv_blocks_used == 0


def test_seeded_sampling_is_reproducible(ckpt):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    prompt = [10, 20, 30, 40]
    first = build_engine(ckpt).generate([(prompt, params)])[0].token_ids
    crowd = [(p, SamplingParams(max_tokens=8, temperature=1.0)) for p in _prompts(5)]
    again = build_engine(ckpt).generate([*crowd, (prompt, params)])[-1].token_ids
    other = (
        build_engine(ckpt)
        .generate(
            [
                (
                    prompt,
                    SamplingParams(
                        max_tokens=16, temperature=1.0, top_p=0.95, seed=12, ignore_eos=True
                    ),
                )
            ]
        )[0]
        .token_ids
    )
    assert first == again
    assert first != other


def test_stop_rules(ckpt):
    engine = build_engine(ckpt)
    prompt = [10, 20, 30]
    free = engine.generate([(prompt, GREEDY)])[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    by_id = engine.generate(
        [
            (
                prompt,
                SamplingParams(
                    max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,)
                ),
            )
        ]
    )[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: first + 1]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    if len(free.text) > 6:
        stop = free.text[3:6]
        by_text = engine.generate(
            [(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))]
        )[0]
        assert by_text.finish_reason == "stop"
        assert by_text.text == free.text[: free.text.index(stop)]
    eos = next(iter(engine.eos_token_ids))
    engine.eos_token_ids = frozenset({free.token_ids[2]})
    out = engine.generate([(prompt, SamplingParams(max_tokens=20, temperature=0))])[0]
    assert out.finish_reason == "stop" and len(out.token_ids) <= 3
    engine.eos_token_ids = frozenset({eos})


def test_streamed_text_adds_up_to_the_decoded_output(ckpt):
    engine = build_engine(ckpt)
    engine.add_request("s", GREEDY, prompt="Hello there, naïve café")
    pieces, ids = [], []
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            ids += out.new_token_ids
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) == 20


def test_logprobs_top_n(ckpt):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=3)
    out = build_engine(ckpt).generate([([1, 2, 3], params)])[0]
    assert len(out.logprobs) == 3
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert tok in lp and len(lp) == 3  # greedy token is also the top-1
        assert max(lp.values()) == lp[tok] <= 0


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt_token_ids": []}, "prompt_token_ids", "empty"),
        ({"prompt_token_ids": [1, 10**6]}, "prompt_token_ids", "outside the vocabulary"),
        ({"prompt_token_ids": [-1]}, "prompt_token_ids", "outside the vocabulary"),
        ({"prompt_token_ids": [5] * 600}, "prompt_token_ids", "context length"),
        ({}, "prompt", "exactly one"),
    ],
)
def test_bad_prompts_name_the_field(ckpt, kwargs, field, words):
    engine = build_engine(ckpt)
    with pytest.raises(InvalidRequestError, match=words) as err:
        engine.add_request("x", GREEDY, **kwargs)
    assert err.value.field == field
    assert engine.stats().num_waiting == 0


def test_checkpoint_without_tokenizer_takes_token_ids(tmp_path):
    from cluster.tiny import make_tiny

    path = make_tiny("mixtral", tmp_path / "no-tok", seed=1, tokenizer=False)
    assert not (path / "tokenizer.json").exists()
    engine = build_engine(path)
    out = engine.generate([([4, 5, 6], GREEDY)])[0]
    assert len(out.token_ids) == 20 and out.text == ""
    with pytest.raises(InvalidRequestError, match="no tokenizer") as err:
        engine.add_request("t", GREEDY, prompt="hello")
    assert err.value.field == "prompt"


def test_bfloat16_engine_generates(tiny_checkpoint):
    engine = build_engine(tiny_checkpoint("deepseek_v3"), dtype="bfloat16")
    assert engine.dtype == torch.bfloat16 and engine.kv_cache[0].dtype == torch.bfloat16
    out = engine.generate([([7, 8, 9, 10], GREEDY)])[0]
    assert len(out.token_ids) == 20 and engine.stats().kv_blocks_used == 0


def test_redundant_expert_slots_give_the_same_tokens(tiny_checkpoint):
    from workers.moe.placement import contiguous_placement

    path = tiny_checkpoint("qwen3_moe")  # 16 experts; 4 extra slots copy experts 0..3
    placement = contiguous_placement(16, 1, num_redundant=4)
    engine = build_engine(path, shard=(placement, 0))
    names = engine.model.checkpoint_tensors()
    assert sum(".experts.0.gate_proj" in n for n in names) == 2  # two MoE layers, read once each
    prompts = _prompts(4, seed=5)
    plain = build_engine(path).generate([(p, GREEDY) for p in prompts])
    spread = engine.generate([(p, GREEDY) for p in prompts])
    assert [o.token_ids for o in spread] == [o.token_ids for o in plain]


def test_detokenizer_fast_route_streams_what_the_wrapper_does(ckpt):
    from workers.engine.build import load_tokenizer
    from workers.engine.detokenizer import IncrementalDetokenizer

    tok = load_tokenizer(ckpt)  # transformers' (the engine's own is tokenizer.json alone)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, tok.vocab_size, (200,), generator=gen).tolist()
    fast = IncrementalDetokenizer(tok, ids[:3])
    assert fast._fast is not None  # the test tokenizers have no clean-up pass
    slow = IncrementalDetokenizer(tok, ids[:3])
    slow._fast = None  # transformers' decode
    assert [fast.add(i) for i in ids[3:]] == [slow.add(i) for i in ids[3:]]
    tok.clean_up_tokenization_spaces = True  # a clean-up pass: only the wrapper applies it
    try:
        assert IncrementalDetokenizer(tok, ids[:3])._fast is None
    finally:
        tok.clean_up_tokenization_spaces = False
