"""Sampling rules on hand-made logits."""

import math

import pytest
import torch

from workers.engine.params import InvalidRequestError, SamplingParams
from workers.engine.sampler import sample


def _draw(logits, params, seed=None, n=1):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    default = torch.Generator().manual_seed(1234)
    return [sample(logits[None], [params], [gen], default)[0][0] for _ in range(n)]


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert _draw(logits, SamplingParams(temperature=0)) == [1]


def test_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    k2 = {sample(logits[None], [SamplingParams(top_k=2)], [gen], gen)[0][0] for _ in range(200)}
    assert k2 == {0, 1}
    p = {sample(logits[None], [SamplingParams(top_p=0.7)], [gen], gen)[0][0] for _ in range(200)}
    assert p == {0, 1}  # 0.5 < 0.7 so the second token is needed, the third is not
    p1 = {sample(logits[None], [SamplingParams(top_p=0.4)], [gen], gen)[0][0] for _ in range(50)}
    assert p1 == {0}


def test_same_seed_same_tokens_regardless_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=7)] * 3
    default = torch.Generator().manual_seed(0)
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    batched = sample(logits, params, gens, default)[0]
    alone = [
        sample(logits[i : i + 1], params[:1], [torch.Generator().manual_seed(7)], default)[0]
        for i in range(3)
    ]
    assert batched == [a[0] for a in alone]


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = torch.Generator()
    tokens, lps = sample(logits, [SamplingParams(temperature=0, logprobs=2)], [None], gen)
    expect = torch.log_softmax(logits[0], -1)
    assert tokens == [0]
    assert set(lps[0]) == {0, 1}
    assert math.isclose(lps[0][1], float(expect[1]), rel_tol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("x" * 300,)}, "stop"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
        ({"stop_token_ids": (999,)}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs).validate(vocab_size=100)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
