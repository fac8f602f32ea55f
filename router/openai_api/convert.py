"""OpenAI bodies <-> `moe.v1` messages, as plain functions.

The one mapping of an OpenAI request onto the engine is: body -> `moe.v1.GenerateRequest`
(`completion_request`, `chat_request`), after which the gRPC path's own checks run
(`router/requests.py`); their errors name gRPC fields (`sampling.top_p`), which `failure` renames
to the OpenAI parameter the client sent (`top_p`, `max_completion_tokens`, `messages`).
Responses are built from the `GenerateResponse` messages the servicer streams.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from router.lifecycle import RequestFailed
from router.openai_api.schema import (
    UNSUPPORTED,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
)
from router.proto import inference_pb2 as pb

__all__ = [
    "ERROR_TYPE",
    "HTTP_STATUS",
    "OpenAIError",
    "Prepared",
    "chat_logprobs",
    "chat_request",
    "completion_logprobs",
    "completion_request",
    "failure",
    "parse_body",
    "render_chat",
    "usage",
]

INT32_MAX = (1 << 31) - 1
INT64 = (-(1 << 63), (1 << 63) - 1)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions

# gRPC status of a RequestFailed -> HTTP status
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# HTTP status -> OpenAI error `type` (others: invalid_request_error below 500, internal_error)
ERROR_TYPE = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}


class OpenAIError(Exception):
    """An error response in OpenAI's shape: `{"error": {message, type, param, code}}`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        default = "invalid_request_error" if self.status < 500 else "internal_error"
        return ERROR_TYPE.get(self.status, default)

    def body(self) -> dict[str, Any]:
        err = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        return {"error": err}


def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param)


@dataclass(frozen=True)
class Prepared:
    """What the HTTP layer needs to run one request and shape its answer."""

    request: pb.GenerateRequest  # goes through the servicer exactly as a gRPC call would
    stream: bool
    include_usage: bool  # stream_options.include_usage
    top_logprobs: int | None  # alternatives per token in the answer; None: no logprobs
    renames: dict[str, str]  # gRPC field -> the OpenAI parameter the client sent


M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes, model: type[M]) -> M:
    """The JSON body as `model`; 400 naming the parameter otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OpenAIError(
            400, f"the request body is not valid JSON ({e}); send a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object of parameters")
    for name, neutral in UNSUPPORTED.items():
        if name in data:
            value = data.pop(name)
            if value is not None and value not in neutral:
                raise _bad(name, f"is not supported by this server; leave it unset (got {value!r})")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise _bad(param, "unknown parameter; remove it") from None
        if first["type"] == "missing":
            raise _bad(param, "is required") from None
        got = repr(first.get("input"))
        got = got if len(got) <= 60 else got[:60] + "..."
        raise _bad(
            param, f"{first['msg'].replace('Input should be', 'must be')} (got {got})"
        ) from None


def _check_common(req: CompletionRequest | ChatCompletionRequest, served_name: str) -> None:
    if req.model is not None and req.model != served_name:
        raise OpenAIError(
            404,
            f"model: the model {req.model!r} does not exist; this server serves "
            f"{served_name!r} (GET /v1/models)",
            "model",
            "model_not_found",
        )
    if req.n != 1:
        raise _bad("n", f"only n=1 is served (got {req.n}); send {req.n} requests instead")
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options", "is only allowed with stream: true")


def _int_in(param: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise _bad(param, f"must be in [{lo}, {hi}] (got {value})")
    return value


def _sampling(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    max_tokens_name: str,
    logprobs: int | None,
    logprobs_name: str,
) -> pb.SamplingParams:
    s = pb.SamplingParams(max_tokens=_int_in(max_tokens_name, max_tokens, 1, INT32_MAX))
    if req.temperature is not None:
        s.temperature = req.temperature
    if req.top_p is not None:
        s.top_p = req.top_p
    if req.top_k is not None and req.top_k != -1:  # vLLM's "no cut" is -1 (ours: 0)
        s.top_k = _int_in("top_k", req.top_k, -1, INT32_MAX)
    if req.seed is not None:
        s.seed = _int_in("seed", req.seed, *INT64)
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    s.stop.extend(stop)
    for i, t in enumerate(req.stop_token_ids or ()):
        s.stop_token_ids.append(_int_in(f"stop_token_ids[{i}]", t, 0, INT32_MAX))
    s.ignore_eos = req.ignore_eos
    if logprobs is not None:
        s.logprobs = _int_in(logprobs_name, logprobs, 0, INT32_MAX)
    return s


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _renames(prompt: str, max_tokens: str, logprobs: str) -> dict[str, str]:
    return {
        "prompt": prompt,
        "prompt_token_ids": prompt,
        "sampling.max_tokens": max_tokens,
        "sampling.logprobs": logprobs,
    }


def completion_request(req: CompletionRequest, served_name: str, request_id: str) -> Prepared:
    """POST /v1/completions -> GenerateRequest (a text prompt is tokenized by the servicer)."""
    _check_common(req, served_name)
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise _bad("prompt", f"one prompt per request is served (got {len(prompt)})")
        prompt = prompt[0]
    max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
    g = pb.GenerateRequest(
        request_id=request_id,
        sampling=_sampling(req, max_tokens, "max_tokens", req.logprobs, "logprobs"),
    )
    if isinstance(prompt, str):
        g.prompt = prompt
    else:
        g.prompt_token_ids.extend(
            _int_in(f"prompt[{i}]", t, 0, INT32_MAX) for i, t in enumerate(prompt)
        )
    renames = _renames("prompt", "max_tokens", "logprobs")
    return Prepared(g, req.stream, _include_usage(req), req.logprobs, renames)


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template reads them (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        if not m.role:
            raise _bad(f"messages[{i}].role", "is empty; use system, user or assistant")
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
    return out


def message_bytes(messages: Sequence[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass")) for m in messages)


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool
) -> list[int]:
    """The conversation as prompt token ids, through the checkpoint's chat template."""
    if not messages:
        raise _bad("messages", "is empty; send at least one message")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise _bad(
            "messages",
            "the served checkpoint has no chat template (tokenizer_config.json "
            "`chat_template`); use /v1/completions with a prompt instead",
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as e:  # a template that raises on this conversation (jinja errors)
        raise _bad("messages", f"the chat template cannot render them ({e})") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_request(
    req: ChatCompletionRequest,
    prompt_ids: list[int],
    served_name: str,
    request_id: str,
    max_model_len: int,
) -> Prepared:
    """POST /v1/chat/completions (messages already rendered to `prompt_ids`) -> GenerateRequest.
    Without a token limit a chat answer may run to the end of the context, as in vLLM."""
    _check_common(req, served_name)
    if req.top_logprobs is not None and not req.logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = limit if limit is not None else max(max_model_len - len(prompt_ids), 1)
    top = (req.top_logprobs or 0) if req.logprobs else None
    g = pb.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling=_sampling(req, max_tokens, name, top, "top_logprobs"),
    )
    renames = _renames("messages", name, "top_logprobs")
    return Prepared(g, req.stream, _include_usage(req), top, renames)


def failure(e: RequestFailed, renames: dict[str, str]) -> OpenAIError:
    """The servicer's failure as an OpenAI error: same status meaning, the parameter renamed."""
    status = HTTP_STATUS.get(e.status, 500)
    message, param = str(e), None
    if e.field is not None:
        base = e.field.split("[", 1)[0]
        short = base.removeprefix("sampling.")
        param = renames.get(base) or short
        body = message.removeprefix(f"{e.field}: ")
        if param != short and short != "prompt":  # `max_tokens (3000)` in the sentence too
            body = body.replace(short, param)
        message = f"{param}: {body}"
    return OpenAIError(status, message, param)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    entries: Sequence[pb.TokenLogprob], text: Callable[[int], str], top: int, offset: int
) -> dict[str, Any]:
    """/v1/completions `logprobs` of some tokens; `offset`: characters of text before them."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        t = text(e.token_id)
        out["tokens"].append(t)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({text(a.token_id): a.logprob for a in e.top[:top]})
        out["text_offset"].append(offset)
        offset += len(t)
    return out


def chat_logprobs(
    entries: Sequence[pb.TokenLogprob], text: Callable[[int], str], top: int
) -> dict[str, Any]:
    """/v1/chat/completions `logprobs` of some tokens."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        t = text(token_id)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

    content = [
        {
            **item(e.token_id, e.logprob),
            "top_logprobs": [item(a.token_id, a.logprob) for a in e.top[:top]],
        }
        for e in entries
    ]
    return {"content": content}
