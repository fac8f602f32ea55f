"""router/server.py: the Router's own gRPC server, on loopback, over a stand-in servicer.

What it must do for the servicer: a `RequestFailed` becomes the call's status with the message
as-is (before or after the first message, unary or streaming); a client's cancel closes the
servicer's stream; reflection lists the service; Router replicas of one node share the port;
stopping lets a call in progress finish. Every wait is bounded by WAIT_S.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.net import free_port
from router.client import ClientError, InferenceClient
from router.lifecycle import RequestFailed
from router.proto import inference_pb2 as pb
from router.server import GrpcFrontDoor

WAIT_S = 10.0
pytestmark = pytest.mark.timeout(60)


class StandIn:
    """prompt "fail-first": UNAVAILABLE before any message; "fail-later": two messages, then
    RESOURCE_EXHAUSTED; "forever": one message, then waits to be cancelled; else max_tokens."""

    def __init__(self) -> None:
        self.closed = threading.Event()  # a "forever" stream was closed by its caller

    async def Generate(self, request, context):  # noqa: N802
        if request.prompt == "fail-first":
            raise RequestFailed("UNAVAILABLE", "no rank can serve; retry")
        if request.prompt == "forever":
            yield pb.GenerateResponse(token_ids=[1], text="a")
            try:
                await asyncio.Event().wait()  # only a cancellation ends this
            finally:
                self.closed.set()
        n = 2 if request.prompt == "fail-later" else request.sampling.max_tokens
        for i in range(n):
            await asyncio.sleep(0.01)
            msg = pb.GenerateResponse(token_ids=[100 + i], text="x")
            if i == n - 1 and request.prompt != "fail-later":
                msg.finish_reason = "length"
            yield msg
        if request.prompt == "fail-later":
            raise RequestFailed("RESOURCE_EXHAUSTED", "the cluster is full; retry later")

    async def Tokenize(self, request, context):  # noqa: N802
        raise RequestFailed("FAILED_PRECONDITION", "no tokenizer; send prompt_token_ids")

    async def GetModelInfo(self, request, context):  # noqa: N802
        return pb.ModelInfo(architecture="stand-in")

    async def GetClusterStatus(self, request, context):  # noqa: N802
        return pb.ClusterStatus()

    async def Drain(self, request, context):  # noqa: N802
        return pb.DrainResponse()


@pytest.fixture
def served():
    servicer, port = StandIn(), free_port()
    door = GrpcFrontDoor(servicer, port=port, host="127.0.0.1").start()
    yield servicer, door, f"127.0.0.1:{port}"
    door.stop(0)


def test_request_failed_becomes_the_status_with_its_sentence(served):
    _, _, target = served
    with InferenceClient(target, timeout_s=WAIT_S) as c:
        with pytest.raises(ClientError) as err:
            c.complete("fail-first")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert err.value.details == "no rank can serve; retry"
        got = []
        with pytest.raises(ClientError) as err:
            for chunk in c.generate("fail-later"):
                got.append(chunk.token_ids)
        assert got == [[100], [101]]  # what was streamed before the failure arrives intact
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details == "the cluster is full; retry later"
        with pytest.raises(ClientError) as err:
            c.tokenize("hi")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert c.model_info().architecture == "stand-in"
        assert c.complete("ok", max_tokens=3).token_ids == [100, 101, 102]


def test_a_cancelled_call_closes_the_servicers_stream(served):
    servicer, _, target = served
    with InferenceClient(target, timeout_s=WAIT_S) as c:
        stream = c.generate("forever")
        assert next(stream).token_ids == [1]
        stream.close()  # cancels the call
    assert servicer.closed.wait(WAIT_S), "the servicer's stream was never closed"


def test_reflection_lists_the_service(served):
    _, _, target = served
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT_S
        )
    names = {s.name for s in answer.list_services_response.service}
    assert "moe.v1.Inference" in names


def test_router_replicas_share_the_port_and_stop_lets_calls_finish():
    port = free_port()
    doors = [GrpcFrontDoor(StandIn(), port=port, host="127.0.0.1").start() for _ in range(2)]
    target = f"127.0.0.1:{port}"
    with InferenceClient(target, timeout_s=WAIT_S) as c:
        stream = c.generate("ok", max_tokens=40)  # ~0.4 s of messages
        first = next(stream)
        stopping = [threading.Thread(target=d.stop, args=(WAIT_S,)) for d in doors]
        for t in stopping:
            t.start()
        rest = list(stream)
        for t in stopping:
            t.join(WAIT_S + 5)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40
    assert rest[-1].finish_reason == "length"
    assert not any(d.alive() for d in doors)


def test_a_port_held_by_another_program_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            GrpcFrontDoor(StandIn(), port=port, host="127.0.0.1").start()


def _relay_run(door: GrpcFrontDoor, prompt: str, take: int | None = None):
    """Iterate the stand-in's Generate through `door.relay` from a loop of this thread."""

    async def main():
        got: list[pb.GenerateResponse] = []
        req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=3))
        stream = door.relay(lambda: door.servicer.Generate(req, None))
        try:
            async for msg in stream:
                got.append(msg)
                if take is not None and len(got) == take:
                    break
        finally:
            await stream.aclose()
        return got

    return asyncio.run(asyncio.wait_for(main(), WAIT_S))


def test_relay_carries_items_and_failures_across_loops(served):
    _, door, _ = served
    msgs = _relay_run(door, "three")
    assert [m.token_ids[0] for m in msgs] == [100, 101, 102] and msgs[-1].finish_reason == "length"
    with pytest.raises(RequestFailed) as err:
        _relay_run(door, "fail-later")
    assert err.value.status == "RESOURCE_EXHAUSTED"


def test_closing_a_relay_closes_the_stream_on_the_server_loop(served):
    servicer, door, _ = served
    assert [m.text for m in _relay_run(door, "forever", take=1)] == ["a"]
    assert servicer.closed.wait(WAIT_S), "the servicer's stream was not closed"
