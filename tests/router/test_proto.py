"""The gRPC API: generated code current and importable, JSON as grpcurl sends it, presence of
optional fields, pickling (Serve's proxy), and one real streaming call over loopback."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from router.proto import inference_pb2, inference_pb2_grpc
from router.proto.generate import GEN_DIR, generate

pb = inference_pb2
WAIT_S = 10.0  # every wait on the server or the channel is bounded by this


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_modules_import_under_router_proto():
    assert pb.__name__ == "router.proto.gen.moe.v1.inference_pb2"
    assert inference_pb2_grpc.__name__ == "router.proto.gen.moe.v1.inference_pb2_grpc"
    assert pb.DESCRIPTOR.name == "moe/v1/inference.proto" and pb.DESCRIPTOR.package == "moe.v1"
    # message classes live in the module they are imported from (pickle needs that)
    assert pb.GenerateRequest.__module__ == pb.__name__
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    assert service.full_name == "moe.v1.Inference"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Tokenize", "GetModelInfo", "GetClusterStatus", "Drain"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert not any(m.server_streaming for name, m in methods.items() if name != "Generate")


def test_committed_generated_code_is_current(tmp_path):
    written = generate(tmp_path / "gen")
    assert written, "generate() wrote nothing"
    fresh, committed = _files(tmp_path / "gen"), _files(GEN_DIR)
    assert sorted(fresh) == sorted(committed), "run `make proto` and commit router/proto/gen"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from a fresh run: run `make proto` and commit the result"


def _full_request() -> inference_pb2.GenerateRequest:
    return pb.GenerateRequest(
        request_id="r1",
        prompt="hello",
        sampling=pb.SamplingParams(
            max_tokens=8,
            temperature=0.0,
            top_p=0.9,
            top_k=5,
            seed=0,
            stop=["\n\n", "END"],
            stop_token_ids=[2, 7],
            ignore_eos=True,
            logprobs=2,
        ),
    )


def test_messages_round_trip_bytes_and_pickle():
    status = pb.ClusterStatus(
        deployments=[
            pb.DeploymentStatus(
                name="decode",
                gangs=[
                    pb.GangStatus(
                        gang_id="decode-1",
                        ranks=[
                            pb.RankStatus(
                                rank=0,
                                replica_id="abc",
                                running_requests=3,
                                queued_prompt_tokens=2**40,  # int64 survives
                                kv_blocks_used=5,
                                kv_blocks_total=64,
                                tokens_per_s=123.5,
                                expert_load=[pb.ExpertLoad(layer=1, tokens_per_expert=[4, 0, 9])],
                            )
                        ],
                    )
                ],
            )
        ]
    )
    response = pb.GenerateResponse(
        token_ids=[11],
        text="x",
        finish_reason="length",
        usage=pb.Usage(prompt_tokens=3, completion_tokens=8),
        logprobs=[
            pb.TokenLogprob(
                token_id=11, logprob=-0.5, top=[pb.TopLogprob(token_id=11, logprob=-0.5)]
            )
        ],
    )
    for message in (_full_request(), response, status):
        again = type(message).FromString(message.SerializeToString())
        assert again == message
        # Serve's gRPC proxy pickles request and response messages between proxy and replica
        assert pickle.loads(pickle.dumps(message)) == message
    rank = pb.ClusterStatus.FromString(status.SerializeToString()).deployments[0].gangs[0].ranks[0]
    assert rank.queued_prompt_tokens == 2**40
    assert list(rank.expert_load[0].tokens_per_expert) == [4, 0, 9]


def test_grpcurl_style_json_parses():
    # the exact body of the grpcurl command
    text_request = json_format.Parse(
        '{"prompt":"hi","sampling":{"max_tokens":8}}', pb.GenerateRequest()
    )
    assert text_request.prompt == "hi" and text_request.sampling.max_tokens == 8
    assert not text_request.prompt_token_ids and not text_request.sampling.HasField("temperature")

    ids_request = json_format.ParseDict({"prompt_token_ids": [1, 2, 3]}, pb.GenerateRequest())
    assert list(ids_request.prompt_token_ids) == [1, 2, 3] and ids_request.prompt == ""
    assert not ids_request.HasField("sampling")

    # JSON out and back in (grpcurl prints camelCase names; both spellings parse)
    as_json = json_format.MessageToJson(_full_request())
    assert '"maxTokens": 8' in as_json
    assert json_format.Parse(as_json, pb.GenerateRequest()) == _full_request()


def test_optional_fields_tell_unset_from_zero():
    optional = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.has_presence}
    assert optional == {"temperature", "top_p", "seed", "logprobs"}

    unset = pb.SamplingParams()
    assert not any(unset.HasField(name) for name in optional)
    zeros = pb.SamplingParams(temperature=0.0, top_p=0.0, seed=0, logprobs=0)
    assert all(zeros.HasField(name) for name in optional)
    assert (zeros.temperature, zeros.seed, zeros.logprobs) == (0.0, 0, 0)
    # presence survives the wire and JSON: an explicit 0 stays "set"
    assert pb.SamplingParams.FromString(zeros.SerializeToString()).HasField("temperature")
    from_json = json_format.ParseDict({"temperature": 0, "seed": 0}, pb.SamplingParams())
    assert from_json.HasField("temperature") and from_json.HasField("seed")
    assert not from_json.HasField("top_p")
    # plain scalars have no presence: asking is an error, so nobody relies on it by mistake
    with pytest.raises(ValueError):
        unset.HasField("max_tokens")


class _ThreeChunks(inference_pb2_grpc.InferenceServicer):
    """Streams three chunks echoing the request; every other method stays UNIMPLEMENTED."""

    def Generate(  # noqa: N802 (the RPC's name)
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        n = request.sampling.max_tokens
        for i in range(n):
            last = i == n - 1
            yield pb.GenerateResponse(
                token_ids=[100 + i],
                text=f"{request.prompt}{i}",
                finish_reason="length" if last else "",
                usage=pb.Usage(prompt_tokens=len(request.prompt), completion_tokens=n)
                if last
                else None,
            )


def test_generate_streams_over_a_real_grpc_server():
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(_ThreeChunks(), server)
    port = server.add_insecure_port("127.0.0.1:0")  # the OS picks a free port
    assert port > 0
    server.start()
    try:
        # no HTTP proxy from the environment may sit between client and loopback server
        options = [("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=WAIT_S)
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = json_format.Parse(
                '{"prompt":"hi","sampling":{"max_tokens":3}}', pb.GenerateRequest()
            )
            chunks = list(stub.Generate(request, timeout=WAIT_S))
            assert [list(c.token_ids) for c in chunks] == [[100], [101], [102]]
            assert [c.text for c in chunks] == ["hi0", "hi1", "hi2"]
            assert [c.finish_reason for c in chunks] == ["", "", "length"]
            assert [c.HasField("usage") for c in chunks] == [False, False, True]
            assert chunks[-1].usage == pb.Usage(prompt_tokens=2, completion_tokens=3)
            # the unary methods are wired too: the base servicer answers UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as info:
                stub.Tokenize(pb.TokenizeRequest(text="hi"), timeout=WAIT_S)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        assert server.stop(grace=None).wait(timeout=WAIT_S), "server did not stop in time"
