"""Python client of the cluster's gRPC API `moe.v1.Inference`, blocking and asyncio.

    with InferenceClient("localhost:9000", token="s3cret") as client:
        for chunk in client.generate("Hello", max_tokens=16):
            print(chunk.text, end="")

Failures raise `ClientError` (gRPC status code + the server's message). Leaving a `generate`
stream early cancels the call, which stops the request's work on the cluster: a sync stream on
`break`; an async one when closed (`contextlib.aclosing`) or garbage collected.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import grpc
import grpc.aio

from router.proto import inference_pb2 as pb
from router.proto import inference_pb2_grpc as pbg

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "AsyncInferenceClient",
    "ClientError",
    "Completion",
    "InferenceClient",
    "StreamChunk",
    "Usage",
    "generate_request",
]


class ClientError(Exception):
    """A failed call: the gRPC status `code` and the server's one-sentence `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.code, self.details)


def _error(e: grpc.RpcError) -> ClientError:
    return ClientError(e.code(), e.details() or "")  # a call's RpcError is also its grpc.Call


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    token_ids: list[int]  # generated since the previous chunk (usually one)
    text: str  # may be "" while a multi-byte character is incomplete
    finish_reason: str | None = None  # "stop" | "length" | "abort", on the last chunk only
    usage: Usage | None = None  # on the last chunk only
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)  # one per token id, if asked


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None only if the stream ended without its last chunk
    usage: Usage | None


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of `generate` and `complete`: `generate_request`'s plus `timeout_s`."""

    prompt_token_ids: Sequence[int] | None
    request_id: str
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int
    seed: int | None
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int | None
    stream_interval: int
    timeout_s: float | None  # this call's deadline; None: the client's timeout_s


def generate_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    request_id: str = "",  # "": the server makes one
    max_tokens: int = 0,  # 0: the server's default
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    stream_interval: int = 0,  # 0: the cluster's router.stream_interval
) -> pb.GenerateRequest:
    """The request of these arguments. None leaves an optional field unset (the server applies
    its default); an explicit 0 is set (HasField tells them apart)."""
    sampling = pb.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs,
        stream_interval=stream_interval,
    )  # fmt: skip
    return pb.GenerateRequest(
        request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, sampling=sampling
    )


def _chunk(msg: pb.GenerateResponse) -> StreamChunk:
    u = msg.usage if msg.HasField("usage") else None
    usage = Usage(u.prompt_tokens, u.completion_tokens) if u is not None else None
    reason = msg.finish_reason or None
    return StreamChunk(list(msg.token_ids), msg.text, reason, usage, list(msg.logprobs))


def _join(chunks: Iterable[StreamChunk]) -> Completion:
    texts, ids, last = [], [], StreamChunk([], "")
    for last in chunks:
        texts.append(last.text)
        ids.extend(last.token_ids)
    return Completion("".join(texts), ids, last.finish_reason, last.usage)


class _Client:
    _connect: Any  # grpc.insecure_channel or grpc.aio.insecure_channel

    def __init__(
        self,
        target: str = "localhost:9000",
        *,
        token: str | None = None,
        timeout_s: float | None = None,  # default deadline of every call; None: none
        options: Sequence[tuple[str, Any]] = (),  # gRPC channel options
    ) -> None:
        self.target, self.timeout_s = target, timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel = type(self)._connect(target, options=list(options))
        self._stub = pbg.InferenceStub(self._channel)

    def _call_args(self, timeout_s: float | None = None) -> dict[str, Any]:
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        return {"timeout": timeout, "metadata": self._metadata}

    def _start_generate(self, prompt: str | None, kw: GenerateOptions) -> Any:
        options: dict[str, Any] = dict(kw)
        args = self._call_args(options.pop("timeout_s", None))
        return self._stub.Generate(generate_request(prompt, **options), **args)


class InferenceClient(_Client):
    """Blocking client over one `grpc.insecure_channel`; `with` closes it."""

    _connect = staticmethod(grpc.insecure_channel)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, prompt: str | None = None, **kw: Unpack[GenerateOptions]
    ) -> Generator[StreamChunk, None, None]:
        """Stream the output; the call starts at the first `next` and is cancelled on close."""
        call = self._start_generate(prompt, kw)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    def complete(self, prompt: str | None = None, **kw: Unpack[GenerateOptions]) -> Completion:
        return _join(self.generate(prompt, **kw))

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, **self._call_args())
        except grpc.RpcError as e:
            raise _error(e) from None

    def tokenize(self, text: str) -> list[int]:
        return list(self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text)).token_ids)

    def model_info(self) -> pb.ModelInfo:
        return self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    def cluster_status(self) -> pb.ClusterStatus:
        return self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest())

    def drain(self, replica_ids: Iterable[str] = ()) -> pb.DrainResponse:
        """Drain the listed ranks, or the whole cluster when none are listed."""
        return self._unary(self._stub.Drain, pb.DrainRequest(replica_ids=list(replica_ids)))


class AsyncInferenceClient(_Client):
    """asyncio client over one `grpc.aio.insecure_channel`; `async with` closes it."""

    _connect = staticmethod(grpc.aio.insecure_channel)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, prompt: str | None = None, **kw: Unpack[GenerateOptions]
    ) -> AsyncGenerator[StreamChunk, None]:
        """Stream the output (`async for`); closing the stream early cancels the call."""
        call = self._start_generate(prompt, kw)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            raise _error(e) from None
        finally:
            call.cancel()

    async def complete(
        self, prompt: str | None = None, **kw: Unpack[GenerateOptions]
    ) -> Completion:
        return _join([c async for c in self.generate(prompt, **kw)])

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, **self._call_args())
        except grpc.RpcError as e:
            raise _error(e) from None

    async def tokenize(self, text: str) -> list[int]:
        response = await self._unary(self._stub.Tokenize, pb.TokenizeRequest(text=text))
        return list(response.token_ids)

    async def model_info(self) -> pb.ModelInfo:
        return await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    async def cluster_status(self) -> pb.ClusterStatus:
        return await self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest())
