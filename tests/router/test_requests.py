"""GenerateRequest validation: each bad input names its field; good input maps 1:1."""

from __future__ import annotations

import re

import pytest
from google.protobuf import json_format

from router.proto import inference_pb2 as pb
from router.requests import DEFAULT_MAX_TOKENS, StopLimits, parse_generate
from workers.engine.build import load_tokenizer
from workers.engine.inputs import PromptLimits
from workers.engine.params import InvalidRequestError

LIMITS = PromptLimits(vocab_size=512, max_model_len=64)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint("qwen3_moe"))


def _req(body: dict) -> pb.GenerateRequest:
    return json_format.ParseDict(body, pb.GenerateRequest())


def test_grpcurl_body_maps_to_engine_inputs(tokenizer):
    parsed = parse_generate(
        _req({"prompt": "hi", "sampling": {"max_tokens": 8}}),
        tokenizer,
        LIMITS,
        new_id=lambda: "generated",
    )
    assert parsed.request_id == "generated"
    assert parsed.prompt_token_ids == tokenizer.encode("hi", add_special_tokens=False)
    assert parsed.params.max_tokens == 8 and parsed.params.temperature == 1.0
    assert parsed.params.seed is None and parsed.params.logprobs is None


def test_explicit_zero_differs_from_unset(tokenizer):
    body = {
        "prompt_token_ids": [1, 2],
        "request_id": "r",
        "sampling": {"temperature": 0, "seed": 0, "logprobs": 0, "top_k": 5},
    }
    parsed = parse_generate(_req(body), tokenizer, LIMITS)
    assert parsed.request_id == "r" and parsed.params.greedy
    assert parsed.params.seed == 0 and parsed.params.logprobs == 0 and parsed.params.top_k == 5
    assert parsed.params.max_tokens == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "prompt", "exactly one"),
        ({"prompt": "hi", "prompt_token_ids": [1]}, "prompt", "exactly one"),
        ({"prompt_token_ids": [1, 9999]}, "prompt_token_ids", "outside the vocabulary"),
        ({"prompt": "hi", "sampling": {"temperature": -1}}, "sampling.temperature", "finite"),
        ({"prompt": "hi", "sampling": {"top_p": 0}}, "sampling.top_p", "(0, 1]"),
        ({"prompt": "hi", "sampling": {"top_p": 1.5}}, "sampling.top_p", "(0, 1]"),
        ({"prompt": "hi", "sampling": {"top_k": -2}}, "sampling.top_k", ">= 0"),
        ({"prompt": "hi", "sampling": {"max_tokens": -3}}, "sampling.max_tokens", "positive"),
        ({"prompt": "hi", "sampling": {"stop": ["x"] * 17}}, "sampling.stop", "at most"),
        ({"prompt": "hi", "sampling": {"stop": ["y" * 300]}}, "sampling.stop[0]", "characters"),
        (
            {"prompt_token_ids": [1] * 60, "sampling": {"max_tokens": 10}},
            "sampling.max_tokens",
            "context length",
        ),
        ({"prompt_token_ids": [1] * 64}, "prompt_token_ids", "context length"),
    ],
)
def test_bad_input_names_the_field(tokenizer, body, field, words):
    with pytest.raises(InvalidRequestError, match=re.escape(words)) as err:
        parse_generate(_req(body), tokenizer, LIMITS)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_router_stop_caps_are_tighter_than_the_engine(tokenizer):
    caps = StopLimits(max_strings=2, max_chars=4)
    ok = parse_generate(
        _req({"prompt": "hi", "sampling": {"stop": ["ab", "abcd"]}}),
        tokenizer,
        LIMITS,
        stop_limits=caps,
    )
    assert ok.params.stop == ("ab", "abcd")
    with pytest.raises(InvalidRequestError, match="at most 2") as err:
        parse_generate(
            _req({"prompt": "hi", "sampling": {"stop": ["a", "b", "c"]}}),
            tokenizer,
            LIMITS,
            stop_limits=caps,
        )
    assert err.value.field == "sampling.stop"
    with pytest.raises(InvalidRequestError, match="1..4") as err:
        parse_generate(
            _req({"prompt": "hi", "sampling": {"stop": ["a", "abcde"]}}),
            tokenizer,
            LIMITS,
            stop_limits=caps,
        )
    assert err.value.field == "sampling.stop[1]"
