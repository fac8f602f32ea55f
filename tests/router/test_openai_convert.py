"""router/openai_api/convert.py: OpenAI bodies onto `moe.v1.GenerateRequest`, errors renamed to
the parameter the client sent, responses' logprobs. The served path is in
tests/cluster/test_openai.py (the official `openai` client against `moe-cluster serve`)."""

from __future__ import annotations

import json

import pytest

from cluster.tiny import build_tokenizer
from router.lifecycle import RequestFailed
from router.openai_api import convert
from router.openai_api.convert import OpenAIError
from router.openai_api.schema import ChatCompletionRequest, CompletionRequest
from router.proto import inference_pb2 as pb
from router.requests import parse_generate
from workers.engine.inputs import PromptLimits
from workers.engine.params import InvalidRequestError

NAME = "tiny"
LIMITS = PromptLimits(vocab_size=512, max_model_len=64, max_prompt_tokens=None)


def completion(**body) -> convert.Prepared:
    req = convert.parse_body(json.dumps(body).encode(), CompletionRequest)
    return convert.completion_request(req, NAME, "cmpl-1")


def chat(ids: list[int], **body) -> convert.Prepared:
    req = convert.parse_body(json.dumps(body).encode(), ChatCompletionRequest)
    return convert.chat_request(req, ids, NAME, "chatcmpl-1", LIMITS.max_model_len)


def bad(fn, *args, **kwargs) -> OpenAIError:
    with pytest.raises(OpenAIError) as err:
        fn(*args, **kwargs)
    return err.value


def test_completion_maps_every_shared_field_onto_the_grpc_request():
    p = completion(
        model=NAME,
        prompt="hello",
        max_tokens=5,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        seed=7,
        stop="\n",
        ignore_eos=True,
        logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    g = p.request
    assert g.prompt == "hello" and g.request_id == "cmpl-1" and not g.prompt_token_ids
    s = g.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (5, 0.0, 0.5, 0, 7)
    assert s.HasField("temperature") and list(s.stop) == ["\n"] and s.ignore_eos
    assert s.logprobs == 2 and p.top_logprobs == 2 and p.stream and p.include_usage


def test_completion_defaults_and_prompt_forms():
    p = completion(prompt=[5, 6, 7])
    assert list(p.request.prompt_token_ids) == [5, 6, 7] and not p.request.prompt
    s = p.request.sampling
    assert s.max_tokens == convert.DEFAULT_COMPLETION_TOKENS
    assert not s.HasField("temperature") and not s.HasField("logprobs") and p.top_logprobs is None
    assert completion(prompt=["one"]).request.prompt == "one"
    assert list(completion(prompt=[[1, 2]]).request.prompt_token_ids) == [1, 2]
    assert bad(completion, prompt=["a", "b"]).param == "prompt"


def test_shape_errors_name_the_parameter():
    e = bad(convert.parse_body, b'{"prompt": "x", "max_token": 3}', CompletionRequest)
    assert (e.status, e.param) == (400, "max_token") and "unknown parameter" in str(e)
    e = bad(convert.parse_body, b'{"max_tokens": 3}', CompletionRequest)
    assert e.param == "prompt" and "required" in str(e)
    e = bad(convert.parse_body, b'{"prompt": "x", "temperature": "hot"}', CompletionRequest)
    assert e.param == "temperature" and "'hot'" in str(e)
    assert bad(convert.parse_body, b"{not json", CompletionRequest).status == 400
    e = bad(convert.parse_body, b'{"prompt": "x", "presence_penalty": 0.5}', CompletionRequest)
    assert e.param == "presence_penalty" and "not supported" in str(e)
    # the neutral value of an unsupported parameter is fine (clients send their defaults)
    assert convert.parse_body(b'{"prompt": "x", "presence_penalty": 0}', CompletionRequest)
    assert bad(completion, prompt="x", n=2).param == "n"
    e = bad(completion, prompt="x", model="gpt-4")
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model")
    assert bad(completion, prompt="x", stream_options={"include_usage": True}).param == (
        "stream_options"
    )
    assert bad(completion, prompt="x", max_tokens=0).param == "max_tokens"
    assert bad(completion, prompt="x", seed=1 << 70).param == "seed"
    e = bad(
        convert.parse_body,
        b'{"messages": [{"role": "u", "content": [{"type": "image"}]}]}',
        ChatCompletionRequest,
    )
    assert e.param.startswith("messages.0.content")


def test_grpc_validation_errors_come_back_under_the_openai_name():
    """The values are checked once, by router/requests.py; the names are the client's."""

    def check(p: convert.Prepared) -> OpenAIError:
        with pytest.raises(InvalidRequestError) as err:
            parse_generate(p.request, build_tokenizer(), LIMITS)
        failed = RequestFailed("INVALID_ARGUMENT", str(err.value), err.value.field)
        return convert.failure(failed, p.renames)

    e = check(completion(prompt="x", top_p=3))
    assert (e.status, e.param) == (400, "top_p") and str(e).startswith("top_p: must be in (0, 1]")
    e = check(chat([1, 2, 3], messages=[], max_completion_tokens=500))
    assert e.param == "max_completion_tokens"
    assert "max_completion_tokens (500)" in str(e) and "sampling." not in str(e)
    assert check(completion(prompt=[9999])).param == "prompt"
    assert check(chat([9999], messages=[])).param == "messages"
    assert check(completion(prompt="x", stop=["a"] * 20)).param == "stop"
    assert check(chat([1], messages=[], logprobs=True, top_logprobs=99)).param == "top_logprobs"


def test_failure_statuses_map_to_http():
    for status, http in [
        ("RESOURCE_EXHAUSTED", 429),
        ("UNAUTHENTICATED", 401),
        ("UNAVAILABLE", 503),
        ("DEADLINE_EXCEEDED", 504),
        ("INTERNAL", 500),
    ]:
        e = convert.failure(RequestFailed(status, "one sentence"), {})
        assert (e.status, str(e), e.param) == (http, "one sentence", None)
        assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_limits_and_logprobs():
    p = chat([1, 2, 3, 4], messages=[])
    assert p.request.sampling.max_tokens == LIMITS.max_model_len - 4  # to the end of context
    assert list(p.request.prompt_token_ids) == [1, 2, 3, 4]
    assert chat([1], messages=[], max_tokens=3).request.sampling.max_tokens == 3
    p = chat([1], messages=[], max_tokens=3, max_completion_tokens=5)
    assert p.request.sampling.max_tokens == 5
    assert chat([1], messages=[]).top_logprobs is None
    assert chat([1], messages=[], logprobs=True).top_logprobs == 0
    assert chat([1], messages=[], logprobs=True, top_logprobs=3).request.sampling.logprobs == 3
    assert bad(chat, [1], messages=[], top_logprobs=3).param == "top_logprobs"


def test_render_chat_uses_the_template_and_refuses_without_one():
    tok = build_tokenizer()
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}],
                }
            ]
        }
    )
    messages = convert.chat_messages(req.messages)
    assert messages == [{"role": "user", "content": "hi!"}]
    ids = convert.render_chat(tok, messages, add_generation_prompt=True)
    assert tok.decode(ids) == "<s>User: hi!\nAssistant:"
    tok.chat_template = None
    e = bad(convert.render_chat, tok, messages, True)
    assert (e.status, e.param) == (400, "messages") and "chat template" in str(e)
    assert bad(convert.render_chat, build_tokenizer(), [], True).param == "messages"


def test_logprobs_shapes():
    entries = [
        pb.TokenLogprob(
            token_id=1,
            logprob=-0.5,
            top=[pb.TopLogprob(token_id=1, logprob=-0.5), pb.TopLogprob(token_id=2, logprob=-1.0)],
        ),
        pb.TokenLogprob(token_id=2, logprob=-2.0, top=[pb.TopLogprob(token_id=3, logprob=-0.1)]),
    ]
    text = {1: "ab", 2: "é", 3: "c"}.__getitem__
    c = convert.completion_logprobs(entries, text, top=1, offset=10)
    assert c == {
        "tokens": ["ab", "é"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"ab": -0.5}, {"c": pytest.approx(-0.1)}],
        "text_offset": [10, 12],
    }
    content = convert.chat_logprobs(entries, text, top=2)["content"]
    assert content[1]["token"] == "é" and content[1]["bytes"] == [0xC3, 0xA9]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["ab", "é"]


def _request(body: bytes, declared: int | None = None):
    from starlette.requests import Request

    length = str(len(body) if declared is None else declared).encode()
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]
    read: list[int] = []

    async def receive():
        read.append(1)
        chunk = pieces.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", length)],
    }
    return Request(scope, receive), read


def test_a_body_past_the_message_limit_is_413_before_it_is_read():
    import asyncio

    from router.openai_api import OpenAIFrontend

    api = OpenAIFrontend(None, None, served_name=NAME, created=0, max_body_bytes=2500)
    req, _ = _request(b"x" * 2000)
    assert asyncio.run(api._body(req)) == b"x" * 2000
    req, read = _request(b"x" * 5000)  # declared too large: refused unread
    assert bad(asyncio.run, api._body(req)).status == 413 and not read
    req, read = _request(b"x" * 5000, declared=100)  # a body longer than declared
    assert bad(asyncio.run, api._body(req)).status == 413 and len(read) == 3  # stops reading
