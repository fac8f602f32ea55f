"""The OpenAI request bodies this server accepts, as pydantic models (validated at the edge).

Only the shape is checked here (types, `n`, the parameters we do not implement); the values are
checked once, for both APIs, by `router/requests.py` after `convert.to_generate` has mapped the
body onto a `moe.v1.GenerateRequest`. Parameters OpenAI defines that this server does not
implement are accepted only at their no-op value (`presence_penalty: 0`), so a client that sends
its defaults works and one that relies on them is told. Unknown parameters are rejected: a typo
(`max_token`) must not be silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "UNSUPPORTED",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "StreamOptions",
    "TextPart",
]

# OpenAI parameters this server does not implement -> the values that mean "not used"
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "logit_bias": ({},),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "parallel_tool_calls": (False, True),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = Field(
        default=False, description="one more chunk before [DONE]: empty choices and the usage"
    )
    continuous_usage_stats: bool = Field(
        default=False, description="(vLLM) usage on every chunk; accepted, reported at the end"
    )


class _Sampling(_Body):
    """The parameters both endpoints share (names as OpenAI and vLLM spell them)."""

    model: str | None = Field(default=None, description="the served model's id (/v1/models)")
    temperature: float | None = Field(default=None, description="0: greedy; unset: 1")
    top_p: float | None = Field(default=None, description="nucleus cut in (0, 1]; unset: 1")
    top_k: int | None = Field(default=None, description="(vLLM) k most likely; 0 or -1: no cut")
    seed: int | None = Field(default=None, description="per-request seed: reproducible output")
    stop: str | list[str] | None = Field(default=None, description="stop strings (not returned)")
    stop_token_ids: list[int] | None = Field(default=None, description="(vLLM) stop token ids")
    ignore_eos: bool = Field(default=False, description="(vLLM) keep going past EOS")
    n: int = Field(default=1, description="completions per request; only 1 is served")
    stream: bool = Field(default=False, description="server-sent events, ending with [DONE]")
    stream_options: StreamOptions | None = Field(default=None, description="with stream only")
    user: str | None = Field(default=None, description="caller's end-user id; logged nowhere")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="text or token ids; a list of one prompt is accepted"
    )
    max_tokens: int | None = Field(default=None, description="new tokens at most; unset: 16")
    logprobs: int | None = Field(
        default=None, description="alternatives per token (0: the sampled token's own only)"
    )


class TextPart(_Body):
    type: Literal["text"] = Field(description="only text parts are served")
    text: str


class ChatMessage(BaseModel):
    # extra keys (`name`, OpenAI's `refusal`, ...) are passed to the chat template as given
    model_config = ConfigDict(extra="allow")

    role: str = Field(description="system, user, assistant, ... as the chat template knows them")
    content: str | list[TextPart] | None = Field(default=None, description="text or text parts")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(description="the conversation; rendered by the template")
    max_completion_tokens: int | None = Field(
        default=None, description="new tokens at most; unset: up to the context length"
    )
    max_tokens: int | None = Field(default=None, description="deprecated name of the above")
    logprobs: bool = Field(default=False, description="return the sampled tokens' logprobs")
    top_logprobs: int | None = Field(
        default=None, description="alternatives per token, with logprobs: true"
    )
    add_generation_prompt: bool = Field(
        default=True, description="(vLLM) end the rendered prompt with the assistant's turn"
    )
