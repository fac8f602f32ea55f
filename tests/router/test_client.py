"""router/client.py against a real gRPC server on loopback hosting a fake `moe.v1.Inference`.

The fake server runs on its own event loop in a background thread; it records what each call
received and signals (threading.Event) when a Generate handler is cancelled. Every wait is
bounded by WAIT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from router.client import (
    AsyncInferenceClient,
    ClientError,
    Completion,
    InferenceClient,
    StreamChunk,
    Usage,
    generate_request,
)
from router.proto import inference_pb2 as pb
from router.proto import inference_pb2_grpc as pbg

WAIT_S = 10.0
NO_PROXY = [("grpc.enable_http_proxy", 0)]  # nothing from the environment between us and loopback
BAD_TOP_P = "sampling.top_p: must be in (0, 1] (1 disables nucleus sampling), got 2.0"

pytestmark = pytest.mark.timeout(60)


class FakeInference(pbg.InferenceServicer):
    """Prompt "bad": INVALID_ARGUMENT; "forever": one chunk, then waits until cancelled;
    otherwise max_tokens chunks, token i has id 100 + i and text "t{i} "."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()  # a "forever" handler was cancelled

    async def Generate(  # noqa: N802 (the RPC's name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.prompt == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_TOP_P)
        if request.prompt == "forever":
            yield pb.GenerateResponse(token_ids=[1], text="a")
            try:
                await asyncio.Event().wait()  # nobody sets it: only a cancellation ends this
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        n = request.sampling.max_tokens
        for i in range(n):
            msg = pb.GenerateResponse(token_ids=[100 + i], text=f"t{i} ")
            if request.sampling.HasField("logprobs"):
                msg.logprobs.add(token_id=100 + i, logprob=-0.5)
            if i == n - 1:
                msg.finish_reason = "length"
                msg.usage.prompt_tokens = len(request.prompt_token_ids)
                msg.usage.completion_tokens = n
            yield msg

    async def Tokenize(self, request, context):  # noqa: N802
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    async def GetModelInfo(self, request, context):  # noqa: N802
        return pb.ModelInfo(architecture="qwen3_moe", vocab_size=512, num_experts=8)

    async def GetClusterStatus(self, request, context):  # noqa: N802
        return pb.ClusterStatus(deployments=[pb.DeploymentStatus(name="prefill")])


class Server:
    """A grpc.aio server on 127.0.0.1 (a free port) in a thread with its own event loop."""

    def __init__(self, servicer: FakeInference) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None
        self.port = self._run(self._start(servicer))
        self.target = f"127.0.0.1:{self.port}"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=WAIT_S)

    async def _start(self, servicer: FakeInference) -> int:
        self.server = grpc.aio.server()
        pbg.add_InferenceServicer_to_server(servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        try:
            self._run(self.server.stop(grace=None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=WAIT_S)
            assert not self.thread.is_alive(), "the server's loop did not stop in time"
            self.loop.close()


@pytest.fixture
def fake() -> FakeInference:
    return FakeInference()


@pytest.fixture
def server(fake: FakeInference) -> Iterator[Server]:
    s = Server(fake)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(server: Server) -> Iterator[InferenceClient]:
    with InferenceClient(server.target, timeout_s=WAIT_S, options=NO_PROXY) as c:
        yield c


def test_request_fields_map_and_unset_optionals_stay_unset(server, fake):
    with InferenceClient(server.target, timeout_s=WAIT_S, options=NO_PROXY) as client:
        list(client.generate("hi", max_tokens=1))
        list(
            client.generate(
                prompt_token_ids=[5, 6, 7],
                request_id="r1",
                max_tokens=2,
                temperature=0.0,  # explicit zeros are set, not "unset"
                top_p=0.5,
                top_k=3,
                seed=0,
                stop=["\n\n", "END"],
                stop_token_ids=[2, 9],
                ignore_eos=True,
                logprobs=0,
            )
        )
    plain, full = fake.requests
    assert plain.prompt == "hi" and not plain.prompt_token_ids and plain.request_id == ""
    assert plain.sampling.max_tokens == 1
    for name in ("temperature", "top_p", "seed", "logprobs"):
        assert not plain.sampling.HasField(name), name
        assert full.sampling.HasField(name), name
    assert full.prompt == "" and list(full.prompt_token_ids) == [5, 6, 7]
    assert full.request_id == "r1"
    s = full.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.logprobs) == (
        2, 0.0, 0.5, 3, 0, 0,
    )  # fmt: skip
    assert list(s.stop) == ["\n\n", "END"] and list(s.stop_token_ids) == [2, 9]
    assert s.ignore_eos
    # the request the client sends is exactly generate_request's
    assert full == generate_request(
        prompt_token_ids=[5, 6, 7], request_id="r1", max_tokens=2, temperature=0.0, top_p=0.5,
        top_k=3, seed=0, stop=["\n\n", "END"], stop_token_ids=[2, 9], ignore_eos=True, logprobs=0,
    )  # fmt: skip


def test_stream_chunks_and_complete_joins_them(client):
    chunks = list(client.generate(prompt_token_ids=[1, 2], max_tokens=3, logprobs=1))
    assert [c.token_ids for c in chunks] == [[100], [101], [102]]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert [c.usage for c in chunks] == [None, None, Usage(prompt_tokens=2, completion_tokens=3)]
    assert [[(lp.token_id, lp.logprob) for lp in c.logprobs] for c in chunks] == [
        [(100, -0.5)], [(101, -0.5)], [(102, -0.5)],
    ]  # fmt: skip
    assert all(isinstance(c, StreamChunk) for c in chunks)

    done = client.complete(prompt_token_ids=[1, 2], max_tokens=3)
    assert done == Completion(
        text="t0 t1 t2 ", token_ids=[100, 101, 102], finish_reason="length", usage=Usage(2, 3)
    )


def test_unary_methods(client):
    assert client.tokenize("ab") == [97, 98]
    info = client.model_info()
    assert isinstance(info, pb.ModelInfo) and info.architecture == "qwen3_moe"
    assert info.num_experts == 8
    assert [d.name for d in client.cluster_status().deployments] == ["prefill"]


def test_bearer_token_is_sent_on_every_call(server, fake):
    with InferenceClient(server.target, token="s3cret", options=NO_PROXY) as client:
        client.complete("hi", max_tokens=1, timeout_s=WAIT_S)
        client.tokenize("x")
    with InferenceClient(server.target, options=NO_PROXY) as client:
        client.complete("hi", max_tokens=1, timeout_s=WAIT_S)
    assert [m.get("authorization") for m in fake.metadata] == [
        "Bearer s3cret", "Bearer s3cret", None,
    ]  # fmt: skip


def test_server_abort_becomes_client_error(client):
    with pytest.raises(ClientError) as info:
        client.complete("bad")
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.details == BAD_TOP_P
    assert str(err) == f"INVALID_ARGUMENT: {BAD_TOP_P}"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ClientError and (again.code, again.details) == (err.code, err.details)
    assert str(again) == str(err)


def test_unreachable_server_is_a_client_error():
    client = InferenceClient("127.0.0.1:1", timeout_s=WAIT_S, options=NO_PROXY)
    with client, pytest.raises(ClientError) as info:
        client.tokenize("x")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_breaking_out_of_a_sync_stream_cancels_the_call(client, fake):
    for chunk in client.generate("forever"):
        assert chunk.text == "a"
        break  # the dropped generator is closed at once (CPython), which cancels the call
    assert fake.cancelled.wait(WAIT_S), "the server's handler was not cancelled"


def _keep_calls(client: Any) -> list[Any]:
    """Hold every Generate call object: gRPC cancels a call it garbage-collects, so only while
    something else references the call does a test show that the client cancels it itself."""
    calls: list[Any] = []
    start = client._stub.Generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(start(*args, **kwargs))
        return calls[-1]

    client._stub.Generate = spy
    return calls


def test_closing_a_sync_stream_cancels_the_call(client, fake):
    calls = _keep_calls(client)
    stream = client.generate("forever")
    assert next(stream).text == "a"
    assert not fake.cancelled.is_set()  # the call stays up while the stream is open
    stream.close()
    assert fake.cancelled.wait(WAIT_S), "the server's handler was not cancelled"
    assert len(calls) == 1 and calls[0].code() == grpc.StatusCode.CANCELLED


def test_a_deadline_cancels_the_call(client, fake):
    with pytest.raises(ClientError) as info:
        list(client.generate("forever", timeout_s=0.5))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake.cancelled.wait(WAIT_S)


def test_async_client(server, fake):
    async def main() -> None:
        async with AsyncInferenceClient(
            server.target, token="t", timeout_s=WAIT_S, options=NO_PROXY
        ) as client:
            chunks = [c async for c in client.generate(prompt_token_ids=[1], max_tokens=2)]
            assert [c.token_ids for c in chunks] == [[100], [101]]
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage == Usage(1, 2)
            done = await client.complete("hi", max_tokens=2, temperature=0.0)
            assert (done.text, done.token_ids) == ("t0 t1 ", [100, 101])
            assert await client.tokenize("ab") == [97, 98]
            assert (await client.model_info()).vocab_size == 512
            assert len((await client.cluster_status()).deployments) == 1
            with pytest.raises(ClientError) as info:
                await client.complete("bad")
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details == BAD_TOP_P
            # leaving a stream early and closing it cancels the call on the server
            calls = _keep_calls(client)
            async with contextlib.aclosing(client.generate("forever")) as stream:
                async for chunk in stream:
                    assert chunk.text == "a"
                    break
            ok = await asyncio.to_thread(fake.cancelled.wait, WAIT_S)
            assert ok, "the server's handler was not cancelled"
            assert len(calls) == 1 and calls[0].cancelled()

    asyncio.run(main())
    assert fake.requests[1].sampling.HasField("temperature")
    assert not fake.requests[1].sampling.HasField("top_p")
    assert all(m.get("authorization") == "Bearer t" for m in fake.metadata)
