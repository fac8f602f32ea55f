"""The OpenAI-compatible HTTP API of `moe-cluster serve`, called with the official `openai`
package (a client nobody here wrote) and once with plain `httpx` for the SSE framing.

One server at a time (1 prefill + 1 decode rank, auth on), the HTTP port served by Serve's
proxy, then by the Router itself: greedy completions and chat,
streamed and not, equal the gRPC API's output and the offline engine's; bad parameters are 400
naming the parameter; no token is 401; a client that closes its stream mid-way gets its request
stopped and the KV back to 0 (GetClusterStatus). Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
import yaml

from cluster.net import free_port
from cluster.offline import PromptSpec, run_offline
from router.client import InferenceClient
from tests.cluster.serve_process import ServeProcess
from workers.engine import SamplingParams
from workers.engine.build import build_engine, load_tokenizer

pytestmark = pytest.mark.timeout(600)
TOKEN = "openai-test-secret"
PROMPT = "Once upon a time ü"  # a multi-byte character in the prompt; outputs have some too
NEW = 24
WAIT_S = 60.0
MAX_INFLIGHT = 4  # router.max_queued_requests: past it, 429


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """No Ray in the test process: `moe-cluster serve` starts its own embedded one."""
    yield


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("qwen3_moe")


@pytest.fixture(scope="module", params=["serve", "auto"])
def server(request, model, tmp_path_factory):
    """Both ways of serving the HTTP port: Serve's HTTP proxy -> the Router replica (default),
    and the Router replica's own HTTP server (router.http_server: auto, the default, with no
    Serve proxy on the port, as `moe-cluster serve` runs it: the same server as `router`)."""
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("openai") / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(model), "served_name": "tiny-qwen"},
                "prefill": {"gang_size": 1, "num_cpus_per_rank": 0.01},
                "decode": {"gang_size": 1, "num_cpus_per_rank": 0.01},
                "router": {
                    "port": grpc_port,
                    "http_port": http_port,
                    "http_server": request.param,
                    "auth_tokens": [TOKEN],
                    "max_queued_requests": MAX_INFLIGHT,
                },
            }
        )
    )
    proc = ServeProcess(["--config", str(config)])
    try:
        ready = proc.wait_for("ready on", 300)
        assert f":{http_port}/v1" in ready, ready
        yield {"grpc": f"localhost:{grpc_port}", "http": f"http://127.0.0.1:{http_port}"}
    finally:
        proc.proc.send_signal(signal.SIGTERM)
        try:
            proc.proc.wait(timeout=90)
        except Exception:
            proc.proc.kill()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(
        base_url=server["http"] + "/v1", api_key=TOKEN, timeout=WAIT_S, max_retries=0
    ) as c:
        yield c


@pytest.fixture(scope="module")
def offline(model):
    engine = build_engine(model)

    def run(prompt: str | list[int], max_tokens: int = NEW) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        (out,) = run_offline(engine, [PromptSpec("p", prompt, params)])
        return out.text

    return run


GREEDY = {"temperature": 0, "max_tokens": NEW, "extra_body": {"ignore_eos": True}}


def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == "tiny-qwen" and card.owned_by == "moe-cluster"


def test_completions_equal_grpc_and_offline(client, server, offline):
    want = offline(PROMPT)
    assert any(ord(c) > 127 for c in want), "pick a prompt whose output has multi-byte text"
    got = client.completions.create(model="tiny-qwen", prompt=PROMPT, **GREEDY)
    (choice,) = got.choices
    assert choice.text == want and choice.finish_reason == "length"
    assert got.usage.completion_tokens == NEW and got.usage.total_tokens == NEW + (
        got.usage.prompt_tokens
    )
    with InferenceClient(server["grpc"], token=TOKEN, timeout_s=WAIT_S) as g:
        grpc_out = g.complete(PROMPT, max_tokens=NEW, temperature=0.0, ignore_eos=True)
    assert grpc_out.text == want and got.usage.prompt_tokens == grpc_out.usage.prompt_tokens

    stream = client.completions.create(
        model="tiny-qwen", prompt=PROMPT, stream=True, stream_options={"include_usage": True},
        **GREEDY,
    )  # fmt: skip
    chunks = list(stream)
    *texts, last = chunks
    assert "".join(c.choices[0].text for c in texts) == want
    assert [c.choices[0].finish_reason for c in texts][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in texts[:-1])
    assert last.choices == [] and last.usage.completion_tokens == NEW
    assert all(c.usage is None for c in texts) and len({c.id for c in chunks}) == 1


def test_chat_equals_offline_and_grpc_of_the_rendered_conversation(client, server, model, offline):
    messages = [
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": "A story about ü, please"},
    ]
    text = load_tokenizer(model).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    ids = load_tokenizer(model).encode(text, add_special_tokens=False)
    want = offline(ids)
    got = client.chat.completions.create(model="tiny-qwen", messages=messages, **GREEDY)
    (choice,) = got.choices
    assert choice.message.role == "assistant" and choice.message.content == want
    assert got.usage.prompt_tokens == len(ids) and choice.finish_reason == "length"
    with InferenceClient(server["grpc"], token=TOKEN, timeout_s=WAIT_S) as g:
        grpc_out = g.complete(
            prompt_token_ids=ids, max_tokens=NEW, temperature=0.0, ignore_eos=True
        )
    assert grpc_out.text == want

    stream = client.chat.completions.create(
        model="tiny-qwen", messages=messages, stream=True, **GREEDY
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want

    lp = client.chat.completions.create(
        model="tiny-qwen", messages=messages, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == NEW and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_bad_parameters_are_400_naming_the_parameter(client):
    cases = [
        ({"prompt": "hi", "top_p": 3}, "top_p"),
        ({"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": "hi", "extra_body": {"top_k": -5}}, "top_k"),
        ({"prompt": [100_000]}, "prompt"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny-qwen", **kwargs)
        assert err.value.body["param"] == param, err.value.body
        assert err.value.body["message"].startswith(f"{param}: ")
        assert "Traceback" not in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-qwen", messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=100_000,
        )  # fmt: skip
    assert err.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert err.value.body["code"] == "model_not_found"


def test_auth_is_the_grpc_token(server):
    with (
        openai.OpenAI(base_url=server["http"] + "/v1", api_key="wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError) as err,
    ):
        c.completions.create(model="tiny-qwen", prompt="hi", max_tokens=2)
    assert err.value.status_code == 401 and "not accepted" in err.value.body["message"]
    for path in ("/v1/models", "/v1/completions"):  # no Authorization header at all
        r = httpx.post(server["http"] + path, json={"prompt": "hi"}, timeout=WAIT_S)
        if path == "/v1/models":
            r = httpx.get(server["http"] + path, timeout=WAIT_S)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_sse_framing_with_plain_httpx(server):
    body = {"prompt": "hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream(
        "POST", server["http"] + "/v1/completions", json=body, headers=headers, timeout=WAIT_S
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "text_completion" for p in payloads)


def _kv_used(status) -> tuple[int, int]:
    ranks = [r for d in status.deployments for g in d.gangs for r in g.ranks]
    return sum(r.kv_blocks_used for r in ranks), sum(r.running_requests for r in ranks)


def _decoded(status) -> int:
    return sum(
        r.tokens_processed
        for d in status.deployments
        if d.name == "decode"
        for g in d.gangs
        for r in g.ranks
    )


def _wait_idle(g: InferenceClient, what: str) -> None:
    """Until no rank holds KV or requests (the status is current within 0.5 s)."""
    deadline = time.monotonic() + WAIT_S
    while (used := _kv_used(g.cluster_status())) != (0, 0):
        assert time.monotonic() < deadline, f"{what}: (KV blocks, requests) still {used}"


def _wait_released(g: InferenceClient, what: str) -> None:
    """Until the Router holds no request (its own count, live), then until no rank does. A
    request whose client left but that went on decoding keeps the Router's count up to its end."""
    deadline = time.monotonic() + WAIT_S
    while (held := g.cluster_status().router_requests) != 0:
        assert time.monotonic() < deadline, f"{what}: the Router still holds {held} requests"
    _wait_idle(g, what)


def test_a_closed_stream_stops_its_request_and_frees_kv(client, server):
    with InferenceClient(server["grpc"], token=TOKEN, timeout_s=WAIT_S) as g:
        _wait_idle(g, "before the test")
        before = _decoded(g.cluster_status())
        stream = client.completions.create(
            model="tiny-qwen", prompt=PROMPT, stream=True, temperature=0, max_tokens=400,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        for seen, _ in enumerate(stream, 1):
            if seen == 3:  # the decode rank streams from the second token on: it holds it now
                break
        stream.close()
        _wait_released(g, "after the client closed its stream")
        decoded = _decoded(g.cluster_status()) - before
        assert decoded < 200, f"the decode rank went on to {decoded} of 400 tokens after close"


def test_a_client_that_gives_up_before_the_answer_stops_its_request(server):
    """Not streaming: the client gives up (cancels its call, which closes the connection) once
    the Router holds the request, whatever the machine's speed; the request stops there."""
    body = dict(
        model="tiny-qwen", prompt=PROMPT, temperature=0, max_tokens=450,
        extra_body={"ignore_eos": True},
    )  # fmt: skip

    async def give_up(g: InferenceClient) -> None:
        async with openai.AsyncOpenAI(
            base_url=server["http"] + "/v1", api_key=TOKEN, timeout=WAIT_S, max_retries=0
        ) as impatient:
            call = asyncio.ensure_future(impatient.completions.create(**body))
            deadline = time.monotonic() + WAIT_S
            while (await asyncio.to_thread(g.cluster_status)).router_requests == 0:
                assert not call.done(), "the answer came before the Router held the request"
                assert time.monotonic() < deadline, "the request never reached the Router"
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    with InferenceClient(server["grpc"], token=TOKEN, timeout_s=WAIT_S) as g:
        _wait_idle(g, "before the test")
        before = _decoded(g.cluster_status())
        asyncio.run(give_up(g))
        _wait_released(g, "after the client gave up")
        decoded = _decoded(g.cluster_status()) - before
        assert decoded < 400, f"the decode rank went on to {decoded} of 450 tokens"


def test_past_the_admission_limit_requests_get_429(server):
    """3x router.max_queued_requests at once: the excess is 429 in OpenAI's shape, the rest
    finish with every token."""
    body = {"prompt": "hi", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=4 * MAX_INFLIGHT)
        async with httpx.AsyncClient(base_url=server["http"], timeout=WAIT_S, limits=limits) as c:
            calls = [
                c.post("/v1/completions", json=body, headers=headers)
                for _ in range(3 * MAX_INFLIGHT)
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(burst())
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= MAX_INFLIGHT // 2, codes
    for r in answers:
        if r.status_code == 429:
            err = r.json()["error"]
            assert (
                err["type"] == "rate_limit_error" and "router.max_queued_requests" in err["message"]
            )
        else:
            assert r.json()["usage"]["completion_tokens"] == 48
