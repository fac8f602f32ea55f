"""`InferenceServicer`: the `moe.v1.Inference` methods, for the Router's gRPC server and (through
`router/openai_api/`) its OpenAI-compatible HTTP API.

Generate: authenticate -> size checks (before any work) -> admission -> validate and tokenize
(a text off the event loop) -> `router/lifecycle.py` runs the request over the rank channels
(prefill rank, KV handoff, decode rank, migration when a rank is lost) -> each delta becomes
one GenerateResponse.

Every failure raises `RequestFailed(status, one sentence)`; the gRPC server (`router/server.py`)
turns it into the call's status.
Cancellation (client cancel, deadline, `router.request_timeout_s`, a broken client connection)
closes the request's stream, which aborts it on its rank and releases an unpulled handoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from router.channels import RankDirectory
from router.lifecycle import RequestFailed, RequestState, run_request
from router.metrics import ITL_SAMPLE
from router.proto import inference_pb2 as pb
from router.requests import StopLimits, check_sizes, parse_generate, utf8_size
from router.streaming import messages
from workers.engine.inputs import PromptLimits
from workers.engine.params import InvalidRequestError
from workers.messages import Delta, RankStatus

__all__ = ["InferenceServicer", "ModelDescription", "RequestFailed", "RouterSettings"]

log = logging.getLogger("moe_cluster.router")
STAGES = ("prefill", "decode")
TOKENS_BATCH = 32  # streamed tokens added to the token counter at once (and at the end)
INLINE_PROMPT_IDS = 8192  # a token-id prompt up to this long is checked on the event loop


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    auth_tokens: tuple[str, ...] = ()  # empty: no authentication
    max_inflight: int = 1024  # Generate calls in progress before RESOURCE_EXHAUSTED
    request_timeout_s: float = 300.0
    stop_limits: StopLimits = dataclasses.field(default_factory=StopLimits)
    max_migrations: int = 3  # times one request may lose its rank before UNAVAILABLE
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a text prompt, checked before tokenizing
    drain_grace_s: float = 30.0  # what a drained rank's in-flight requests get to finish
    stream_interval: int = 1  # tokens per message when the request does not say


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    architecture: str
    model_path: str
    vocab_size: int
    max_model_len: int
    num_experts: int
    num_layers: int
    dtype: str


def _fail(code: grpc.StatusCode, message: str, field: str | None = None) -> NoReturn:
    raise RequestFailed(code.name, message, field)


class InferenceServicer:
    def __init__(
        self,
        directory: Callable[[], RankDirectory],
        *,
        tokenizer: Any,
        limits: PromptLimits,
        model: ModelDescription,
        settings: RouterSettings,
        metrics: Any = None,  # a RouterMetrics (Ray metrics); None records nothing
    ) -> None:
        self._directory = directory  # the rank channels, created on this replica's event loop
        self.tokenizer = tokenizer
        self.limits = limits
        self.model = model
        self.settings = settings
        self._tokens = [t.encode() for t in settings.auth_tokens]
        self.inflight = 0
        self.metrics = metrics
        self.draining = False  # the whole cluster is draining: admit nothing

    # --- moe.v1.Inference ------------------------------------------------------------------
    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.authenticate(grpc_context)
        try:
            check_sizes(request, self.limits, self.settings.max_prompt_bytes)
        except InvalidRequestError as e:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
        if self.draining:
            _fail(
                grpc.StatusCode.UNAVAILABLE,
                "the cluster is draining for maintenance and admits no new requests; retry "
                "against another cluster or later",
            )
        if self.inflight >= self.settings.max_inflight:
            _fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.inflight} requests in progress, the limit (router.max_queued_requests) "
                "is reached; retry later",
            )
        self.inflight += 1
        done = False
        clock = _Clock(self.metrics)
        try:
            try:
                parsed = await self._parse(request)
            except InvalidRequestError as e:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
            rid, n_prompt = parsed.request_id, len(parsed.prompt_token_ids)
            state = RequestState(
                rid,
                parsed.prompt_token_ids,
                parsed.params,
                max_migrations=self.settings.max_migrations,
            )
            interval = parsed.stream_interval or self.settings.stream_interval
            async with asyncio.timeout(self.settings.request_timeout_s):
                stream = run_request(self._directory(), state)
                async with contextlib.aclosing(stream):
                    async for delta in messages(stream, interval):
                        clock.tokens(delta)
                        yield _response(delta, n_prompt)
            done = True
        except TimeoutError:
            _fail(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request ran longer than router.request_timeout_s "
                f"({self.settings.request_timeout_s:g} s) and was stopped",
            )
        finally:
            self.inflight -= 1
            clock.finish(done)

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, grpc_context: Any = None
    ) -> pb.TokenizeResponse:
        self.authenticate(grpc_context)
        if self.tokenizer is None:
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the served checkpoint has no tokenizer files; send prompt_token_ids instead",
            )
        size = utf8_size(request.text, self.settings.max_prompt_bytes)
        if size > self.settings.max_prompt_bytes:
            _fail(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text: {size} bytes, at most {self.settings.max_prompt_bytes} are accepted "
                "(router.max_prompt_bytes); send less text",
            )
        ids = await asyncio.to_thread(self.tokenizer.encode, request.text, add_special_tokens=False)
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, grpc_context: Any = None
    ) -> pb.ModelInfo:
        self.authenticate(grpc_context)
        return pb.ModelInfo(**dataclasses.asdict(self.model))  # same field names as the proto

    async def GetClusterStatus(  # noqa: N802
        self, request: pb.GetClusterStatusRequest, grpc_context: Any = None
    ) -> pb.ClusterStatus:
        self.authenticate(grpc_context)
        try:  # the router's own view: every rank it holds a channel to, current within 0.5 s
            statuses = self._directory().statuses()
        except Exception as e:  # never INTERNAL with a traceback
            log.warning("cluster status unavailable: %r", e)
            _fail(
                grpc.StatusCode.UNAVAILABLE,
                "the cluster status is not available yet; retry in a few seconds",
            )
        status = cluster_status_message(statuses)
        status.router_requests = self.inflight
        return status

    async def Drain(  # noqa: N802
        self, request: pb.DrainRequest, grpc_context: Any = None
    ) -> pb.DrainResponse:
        self.authenticate(grpc_context)
        channels = self._directory().channels
        for i, rid in enumerate(request.replica_ids):
            if rid not in channels:
                _fail(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"replica_ids[{i}]: no serving rank has replica id {rid!r}; take the ids "
                    "from GetClusterStatus",
                )
        ids = list(request.replica_ids) or list(channels)
        if not request.replica_ids:
            self.draining = True
        held = 0
        for rid in ids:
            ch = channels[rid]
            held += ch.reported.running_requests
            ch.drain(self.settings.drain_grace_s)
        log.warning("draining %d ranks (%d requests held)", len(ids), held)
        return pb.DrainResponse(replica_ids=ids, running_requests=held)

    # --- helpers -----------------------------------------------------------------------------
    async def _parse(self, request: pb.GenerateRequest) -> Any:
        """`parse_generate` of the request. Tokenizing a text takes a while: never on the event
        loop. Token ids are only checked (~50 ns each): up to INLINE_PROMPT_IDS of them on the
        loop, since a hop to a worker thread costs more (and under a burst its thread and the
        loop trade the GIL, holding up every other call on the loop)."""
        parse = functools.partial(
            parse_generate,
            request,
            self.tokenizer,
            self.limits,
            stop_limits=self.settings.stop_limits,
        )
        if not request.prompt and len(request.prompt_token_ids) <= INLINE_PROMPT_IDS:
            return parse()
        return await asyncio.to_thread(parse)

    def authenticate(self, ctx: Any) -> None:
        """UNAUTHENTICATED unless `ctx`'s metadata has an accepted bearer token (or auth is off)."""
        if not self._tokens:
            return
        metadata = dict(ctx.invocation_metadata()) if ctx is not None else {}
        header = metadata.get("authorization", "")
        if not header:
            _fail(
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
            _fail(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted")


class _Clock:
    """Per-request latency bookkeeping for the router metrics (no-op without metrics).

    A Ray metric record costs ~50 µs of router CPU (tags merged and validated in Python, then
    the core worker), which per streamed token was a quarter of the Router's CPU at 32 streams
    (py-spy). So the token counter is added to in batches of TOKENS_BATCH (and at the end), and
    the inter-token histogram gets one of every ITL_SAMPLE gaps of a request (the first, then
    every ITL_SAMPLE-th): its quantiles stay those of all gaps, its count is ~1/ITL_SAMPLE."""

    def __init__(self, metrics: Any) -> None:
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.first = True
        self.reason = "error"
        self.gaps = 0  # inter-token gaps seen (sampled into the histogram)
        self.unrecorded = 0  # tokens not yet added to the counter

    def tokens(self, chunk: Delta) -> None:
        if self.m is None:
            return
        now, n = time.perf_counter(), len(chunk.token_ids)
        if self.first:
            self.m.ttft.observe(now - self.start)
            self.first = False
        elif n:
            if self.gaps % ITL_SAMPLE == 0:
                self.m.itl.observe((now - self.last) / n)
            self.gaps += 1
        self.last = now
        self.unrecorded += n
        if self.unrecorded >= TOKENS_BATCH:
            self.m.tokens.inc(self.unrecorded)
            self.unrecorded = 0
        if chunk.finish_reason not in (None, "handoff"):
            self.reason = chunk.finish_reason

    def finish(self, done: bool) -> None:
        if self.m is not None:
            if self.unrecorded:
                self.m.tokens.inc(self.unrecorded)
            reason = self.reason if done else "cancelled_or_failed"
            self.m.requests.inc(1, {"finish_reason": reason})


def _response(chunk: Delta, num_prompt_tokens: int) -> pb.GenerateResponse:
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
                accepting=s.accepting,
                kv_blocks_cached=s.kv_blocks_cached,
                prefix_query_tokens=s.prefix_query_tokens,
                prefix_hit_tokens=s.prefix_hit_tokens,
                prefix_hit_rate=s.prefix_hit_rate,
            )
            for layer, counts in zip(s.moe_layers, s.expert_load, strict=True):
                r.expert_load.add(layer=layer, tokens_per_expert=counts)
    return out
