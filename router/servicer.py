"""`InferenceServicer`: the `moe.v1.Inference` methods as Ray Serve's gRPC proxy calls them.

Generate: authenticate -> validate and tokenize -> a prefill rank (the prefill request router
picks it) returns the first token and a reference to the prompt's KV -> that token is streamed
at once -> a decode rank (the decode request router picks it) pulls the KV by reference from the
Ray object store and streams the rest. The KV never passes through here.

Every failure leaves as a gRPC status with one sentence: the code is set on the context and an
exception raised (Serve drops a code set before a streaming method's first yield otherwise).
Cancellation (client cancel, deadline, `router.request_timeout_s`) cancels the rank calls, which
abort the request and free its KV on the rank.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from ray.serve.exceptions import BackPressureError

from router.proto import inference_pb2 as pb
from router.requests import StopLimits, parse_generate
from workers.engine.inputs import PromptLimits
from workers.engine.params import InvalidRequestError, QueueFullError
from workers.messages import Chunk, DecodeJob, PrefillJob, PrefillResult, RankStatus

__all__ = ["InferenceServicer", "ModelDescription", "RequestFailed", "RouterSettings"]

log = logging.getLogger("moe_cluster.router")
STAGES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    auth_tokens: tuple[str, ...] = ()  # empty: no authentication
    max_inflight: int = 1024  # Generate calls in progress before RESOURCE_EXHAUSTED
    request_timeout_s: float = 300.0
    stop_limits: StopLimits = dataclasses.field(default_factory=StopLimits)


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    architecture: str
    model_path: str
    vocab_size: int
    max_model_len: int
    num_experts: int
    num_layers: int
    dtype: str


class RequestFailed(Exception):
    """Raised after the gRPC status is set on the context, so Serve sends that status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # travels back to Serve's proxy: pickle both arguments
        return type(self), (self.code, str(self))


def _fail(ctx: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    if ctx is not None:
        ctx.set_code(code)
        ctx.set_details(message)
    raise RequestFailed(code, message)


def _cause(e: BaseException) -> BaseException:
    """The exception a rank raised, without Ray's wrapper (whose text carries a traceback)."""
    return getattr(e, "cause", None) or e


class InferenceServicer:
    def __init__(
        self,
        prefill: Any,  # Serve DeploymentHandle of the prefill ranks
        decode: Any,  # Serve DeploymentHandle of the decode ranks
        *,
        tokenizer: Any,
        limits: PromptLimits,
        model: ModelDescription,
        settings: RouterSettings,
        cluster_status: Callable[[], Awaitable[list[RankStatus]]],
        metrics: Any = None,  # a RouterMetrics (Ray metrics); None records nothing
    ) -> None:
        self._prefill = prefill.options(method_name="prefill")
        self._decode = decode.options(method_name="decode", stream=True)
        self.tokenizer = tokenizer
        self.limits = limits
        self.model = model
        self.settings = settings
        self._cluster_status = cluster_status
        self._tokens = [t.encode() for t in settings.auth_tokens]
        self.inflight = 0
        self.metrics = metrics

    # --- moe.v1.Inference ------------------------------------------------------------------
    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        self._authenticate(grpc_context)
        try:
            parsed = parse_generate(
                request, self.tokenizer, self.limits, stop_limits=self.settings.stop_limits
            )
        except InvalidRequestError as e:
            _fail(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.inflight >= self.settings.max_inflight:
            _fail(
                grpc_context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.inflight} requests in progress, the limit (router.max_queued_requests) "
                "is reached; retry later",
            )
        rid, n_prompt = parsed.request_id, len(parsed.prompt_token_ids)
        self.inflight += 1
        calls: list[Any] = []
        done = False
        clock = _Clock(self.metrics)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                calls.append(
                    self._prefill.remote(PrefillJob(rid, parsed.prompt_token_ids, parsed.params))
                )
                result: PrefillResult = await calls[-1]
                clock.tokens(result.first)
                yield _response(result.first, n_prompt)
                if result.first.finish_reason == "handoff":
                    calls.append(self._decode.remote(DecodeJob(rid, n_prompt, result.handoff)))
                    async for chunk in calls[-1]:
                        clock.tokens(chunk)
                        yield _response(chunk, n_prompt)
            done = True
        except RequestFailed:
            raise
        except TimeoutError:
            _fail(
                grpc_context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {rid} ran longer than router.request_timeout_s "
                f"({self.settings.request_timeout_s:g} s) and was stopped",
            )
        except Exception as e:
            self._fail_from_rank(grpc_context, rid, e)
        finally:
            self.inflight -= 1
            clock.finish(done)
            if not done:  # cancelled or failed: stop the rank's work, free its KV
                for call in calls:
                    call.cancel()

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, grpc_context: Any = None
    ) -> pb.TokenizeResponse:
        self._authenticate(grpc_context)
        if self.tokenizer is None:
            _fail(
                grpc_context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the served checkpoint has no tokenizer files; send prompt_token_ids instead",
            )
        ids = self.tokenizer.encode(request.text, add_special_tokens=False)
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, grpc_context: Any = None
    ) -> pb.ModelInfo:
        self._authenticate(grpc_context)
        return pb.ModelInfo(**dataclasses.asdict(self.model))  # same field names as the proto

    async def GetClusterStatus(  # noqa: N802
        self, request: pb.GetClusterStatusRequest, grpc_context: Any = None
    ) -> pb.ClusterStatus:
        self._authenticate(grpc_context)
        return cluster_status_message(await self._cluster_status())

    # --- helpers -----------------------------------------------------------------------------
    def _authenticate(self, ctx: Any) -> None:
        if not self._tokens:
            return
        metadata = dict(ctx.invocation_metadata()) if ctx is not None else {}
        header = metadata.get("authorization", "")
        if not header:
            _fail(
                ctx,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing `authorization: Bearer <token>` metadata; this cluster requires a token",
            )
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        # compare against every token, always: the time taken does not tell which one matched
        ok = False
        for t in self._tokens:
            ok |= hmac.compare_digest(given, t)
        if scheme.lower() != "bearer" or not ok:
            _fail(ctx, grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted")

    def _fail_from_rank(self, ctx: Any, rid: str, e: Exception) -> NoReturn:
        cause = _cause(e)
        if isinstance(cause, InvalidRequestError):
            _fail(ctx, grpc.StatusCode.INVALID_ARGUMENT, str(cause))
        if isinstance(cause, QueueFullError | BackPressureError):
            _fail(ctx, grpc.StatusCode.RESOURCE_EXHAUSTED, f"the cluster is full ({cause}); retry")
        log.error("request %s failed on a rank: %r", rid, cause)
        _fail(
            ctx,
            grpc.StatusCode.UNAVAILABLE,
            f"request {rid} failed on a rank ({type(cause).__name__}); retry, and see the "
            "rank logs in the Ray dashboard if it persists",
        )


class _Clock:
    """Per-request latency bookkeeping for the router metrics (no-op without metrics)."""

    def __init__(self, metrics: Any) -> None:
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.first = True
        self.reason = "error"

    def tokens(self, chunk: Chunk) -> None:
        if self.m is None:
            return
        now, n = time.perf_counter(), len(chunk.token_ids)
        if self.first:
            self.m.ttft.observe(now - self.start)
            self.first = False
        elif n:
            self.m.itl.observe((now - self.last) / n)
        self.last = now
        if n:
            self.m.tokens.inc(n)
        if chunk.finish_reason not in (None, "handoff"):
            self.reason = chunk.finish_reason

    def finish(self, done: bool) -> None:
        if self.m is not None:
            reason = self.reason if done else "cancelled_or_failed"
            self.m.requests.inc(1, {"finish_reason": reason})


def _response(chunk: Chunk, num_prompt_tokens: int) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text)
    for tid, lp in zip(chunk.token_ids, chunk.logprobs or (), strict=False):
        entry = msg.logprobs.add(token_id=tid, logprob=lp.get(tid, float("nan")))
        for alt, alt_lp in sorted(lp.items(), key=lambda kv: -kv[1]):
            entry.top.add(token_id=alt, logprob=alt_lp)
    if chunk.finished and chunk.finish_reason != "handoff":
        msg.finish_reason = chunk.finish_reason or ""
        msg.usage.prompt_tokens = num_prompt_tokens
        msg.usage.completion_tokens = chunk.num_completion_tokens
    return msg


def cluster_status_message(statuses: list[RankStatus]) -> pb.ClusterStatus:
    """Group rank snapshots by stage and gang (ordered: prefill, decode; gang id; rank)."""
    out = pb.ClusterStatus()
    for stage in STAGES:
        dep = out.deployments.add(name=stage)
        ranks = sorted((s for s in statuses if s.stage == stage), key=lambda s: (s.gang_id, s.rank))
        gangs: dict[str, Any] = {}
        for s in ranks:
            if s.gang_id not in gangs:
                gangs[s.gang_id] = dep.gangs.add(gang_id=s.gang_id)
            r = gangs[s.gang_id].ranks.add(
                rank=s.rank,
                replica_id=s.replica_id,
                running_requests=s.running_requests,
                queued_prompt_tokens=s.queued_prompt_tokens,
                kv_blocks_used=s.kv_blocks_used,
                kv_blocks_total=s.kv_blocks_total,
                tokens_per_s=s.tokens_per_s,
                tokens_processed=s.tokens_processed,
            )
            for layer, counts in zip(s.moe_layers, s.expert_load, strict=True):
                r.expert_load.add(layer=layer, tokens_per_expert=counts)
    return out
