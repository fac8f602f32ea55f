"""gRPC `GenerateRequest` -> the engine's plain request types, with every input check.

Errors are `InvalidRequestError`s whose `field` is the request's field path (`sampling.top_p`,
`prompt_token_ids`), for the servicer to map to INVALID_ARGUMENT with the message as-is.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from workers.engine.inputs import PromptLimits, encode_prompt
from workers.engine.params import InvalidRequestError, SamplingParams

__all__ = [
    "MAX_STREAM_INTERVAL",
    "ParsedGenerate",
    "StopLimits",
    "check_sizes",
    "parse_generate",
    "utf8_size",
]

DEFAULT_MAX_TOKENS = 16
MAX_STREAM_INTERVAL = 1024  # tokens per streamed message, at most (request and config)


@dataclass(frozen=True)
class ParsedGenerate:
    request_id: str  # the client's, or a fresh one
    prompt_token_ids: list[int]  # validated against the vocabulary and the context length
    params: SamplingParams  # validated
    stream_interval: int = 0  # tokens per streamed message; 0: the cluster's default


def _sampling(req) -> SamplingParams:
    s = req.sampling

    def opt(name: str, default):
        return getattr(s, name) if s.HasField(name) else default

    return SamplingParams(
        max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0),
        top_k=s.top_k,
        seed=opt("seed", None),
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=opt("logprobs", None),
    )


@dataclass(frozen=True)
class StopLimits:
    """The router's own caps on stop strings (tighter than the engine's, from the config)."""

    max_strings: int = 16
    max_chars: int = 256


def _check_stop(stop, caps: StopLimits) -> None:
    if len(stop) > caps.max_strings:
        raise InvalidRequestError(
            "sampling.stop",
            f"{len(stop)} stop strings, at most {caps.max_strings} are accepted; send fewer",
        )
    for i, s in enumerate(stop):
        if not 0 < len(s) <= caps.max_chars:
            raise InvalidRequestError(
                f"sampling.stop[{i}]",
                f"has {len(s)} characters; each stop string needs 1..{caps.max_chars}",
            )


def utf8_size(text: str, limit: int) -> int:
    """UTF-8 bytes of `text`, or a lower bound above `limit` without encoding it all."""
    if len(text) > limit:  # at least one byte per character
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def check_sizes(req, limits: PromptLimits, max_prompt_bytes: int) -> None:
    """The cheap checks that run before any work (tokenizing, queueing): how big the prompt is.
    A too-large request can never stall other streams."""
    size = utf8_size(req.prompt, max_prompt_bytes)
    if size > max_prompt_bytes:
        raise InvalidRequestError(
            "prompt",
            f"{size} bytes, at most {max_prompt_bytes} are accepted (router.max_prompt_bytes); "
            "send a shorter prompt",
        )
    n = len(req.prompt_token_ids)
    if n >= limits.max_model_len:
        raise InvalidRequestError(
            "prompt_token_ids",
            f"{n} tokens leave no room to generate within the context length "
            f"{limits.max_model_len}; shorten the prompt",
        )


def parse_generate(
    req,
    tokenizer,
    limits: PromptLimits,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    stop_limits: StopLimits = StopLimits(),
) -> ParsedGenerate:
    """Check a `moe.v1.GenerateRequest` and turn it into engine inputs."""
    if bool(req.prompt) == bool(len(req.prompt_token_ids)):
        raise InvalidRequestError(
            "prompt", "give exactly one of prompt (non-empty text) or prompt_token_ids"
        )
    params = _sampling(req)
    _check_stop(req.sampling.stop, stop_limits)
    try:
        params.validate(limits.vocab_size)
    except InvalidRequestError as e:
        message = str(e).removeprefix(f"{e.field}: ")
        raise InvalidRequestError(f"sampling.{e.field}", message) from None
    interval = req.sampling.stream_interval
    if not 0 <= interval <= MAX_STREAM_INTERVAL:
        raise InvalidRequestError(
            "sampling.stream_interval",
            f"must be in [0, {MAX_STREAM_INTERVAL}] tokens per message (0: the cluster's "
            f"default), got {interval}",
        )
    ids = encode_prompt(tokenizer, limits, req.prompt or None, list(req.prompt_token_ids) or None)
    if len(ids) + params.max_tokens > limits.max_model_len:
        raise InvalidRequestError(
            "sampling.max_tokens",
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
            f"length {limits.max_model_len}; lower max_tokens or shorten the prompt",
        )
    return ParsedGenerate(req.request_id or new_id(), ids, params, interval)
