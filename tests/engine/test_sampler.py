"""Sampling rules on hand-made logits; degenerate values never raise out of the sampler."""

import math

import pytest
import torch

from workers.engine.params import GREEDY_BELOW, InvalidRequestError, SamplingParams
from workers.engine.sampler import sample


def _draw(logits, params, n=1, counter=0):
    default = torch.Generator().manual_seed(1234)
    return [sample(logits[None], [params], [counter], default).tokens[0] for _ in range(n)]


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert _draw(logits, SamplingParams(temperature=0)) == [1]


def test_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)

    def support(params: SamplingParams, n: int) -> set[int]:
        return {sample(logits[None], [params], [0], gen).tokens[0] for _ in range(n)}

    assert support(SamplingParams(top_k=2), 200) == {0, 1}
    assert support(SamplingParams(top_p=0.7), 200) == {0, 1}  # 0.5 < 0.7: the 2nd is needed
    assert support(SamplingParams(top_p=0.4), 50) == {0}


def test_same_seed_same_tokens_regardless_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=7)] * 3
    default = torch.Generator().manual_seed(0)
    batched = sample(logits, params, [5, 5, 5], default).tokens
    alone = [sample(logits[i : i + 1], params[:1], [5], default).tokens[0] for i in range(3)]
    assert batched == alone


def test_seeded_draw_depends_only_on_seed_and_counter():
    """Counter-based seeds: the i-th token of a seeded request is the same wherever it runs
    (a handoff or a migration carries no generator state), and different counters differ."""
    logits = torch.zeros(1, 1000)  # uniform: the draw is all randomness
    p = SamplingParams(temperature=1.0, seed=11)
    draws = [_draw(logits[0], p, counter=i)[0] for i in range(20)]
    assert draws == [_draw(logits[0], p, counter=i)[0] for i in range(20)]
    assert len(set(draws)) > 10
    other = [
        _draw(logits[0], SamplingParams(temperature=1.0, seed=12), counter=i)[0] for i in range(20)
    ]
    assert other != draws


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = torch.Generator()
    out = sample(logits, [SamplingParams(temperature=0, logprobs=2)], [0], gen)
    expect = torch.log_softmax(logits[0], -1)
    assert out.tokens == [0]
    assert set(out.logprobs[0]) == {0, 1}
    assert math.isclose(out.logprobs[0][1], float(expect[1]), rel_tol=1e-6)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6, GREEDY_BELOW / 2, 5e-324])
def test_tiny_temperatures_are_greedy(temperature):
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0]) * 100
    params = SamplingParams(temperature=temperature, top_p=0.5, top_k=2)
    params.validate(vocab_size=4)
    assert params.greedy
    assert _draw(logits, params, n=5) == [1] * 5


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-4, 1e-3, 100.0])
def test_extreme_but_valid_temperatures_sample_without_error(temperature):
    logits = torch.randn(8, 4096) * 30
    params = [SamplingParams(temperature=temperature, top_p=1e-9, top_k=1 << 30, seed=3)] * 8
    out = sample(logits, params, list(range(8)), torch.Generator())
    assert out.errors == {} and all(0 <= t < 4096 for t in out.tokens)


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.randn(3, 10)
    logits[1] = float("nan")
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7), SamplingParams()]
    out = sample(logits, params, [0, 0, 0], torch.Generator().manual_seed(0))
    assert set(out.errors) == {1} and "finite" in out.errors[1]
    assert out.tokens[1] == -1 and 0 <= out.tokens[0] < 10 and 0 <= out.tokens[2] < 10


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e6}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 2**64}, "seed"),
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
