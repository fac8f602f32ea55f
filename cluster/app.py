"""`build_app(args)`: the whole Serve application from one `ClusterConfig` (the single
`import_path` of `serve run`, the Serve YAML and the RayService `serveConfigV2`).

Three deployments:
- `PrefillRank` and `DecodeRank`: one replica per rank, gang-scheduled (gang size = the
  expert-parallel size, PACK or SPREAD); a gang is one torch.distributed group whose ranks meet
  through the application's `GangRegistry`. Scaling is in whole gangs.
- `Router`: the gRPC ingress behind Serve's gRPC proxy (`InferenceServicer`), with handles to
  both stages; each stage's own request router balances its ranks.

The wrappers here stay thin: the ranks are `workers.ranks`, the API is `router.servicer`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from cluster.config import ClusterConfig, DecodeConfig, PrefillAutoscaling, PrefillConfig
from cluster.metrics import RankMetrics
from cluster.registry import REPORT_PERIOD_S, gang_init_method, registry
from router.metrics import RouterMetrics
from router.requests import StopLimits
from router.servicer import InferenceServicer, ModelDescription, RouterSettings
from workers.engine import EngineConfig, SchedulerConfig
from workers.engine.build import load_tokenizer
from workers.engine.inputs import PromptLimits
from workers.ep_rank import num_routed_experts
from workers.loader import load_config
from workers.messages import Chunk, DecodeJob, PrefillJob, PrefillResult
from workers.ranks import DecodeRank, GangMember, PrefillRank, StageRank

__all__ = ["APP_NAME", "build_app", "engine_config"]

log = logging.getLogger("moe_cluster")
APP_NAME = "moe-cluster"
ROUTING_STATS_PERIOD_S = 0.2
# A rank being scaled away finishes its in-flight requests first: Serve waits for them up to
# graceful_shutdown_timeout_s = the longest a request may run + this margin, then force-kills.
GRACEFUL_MARGIN_S = 30.0
_RANK_CLASSES: dict[str, type[StageRank]] = {"prefill": PrefillRank, "decode": DecodeRank}


def engine_config(cfg: ClusterConfig, stage: str) -> EngineConfig:
    """The per-rank engine settings of a stage. Prefill ranks hold a prompt's KV only until the
    handoff; they use the decode stage's block size so a handoff maps block for block."""
    d = cfg.decode
    if stage == "prefill":
        sched = SchedulerConfig(
            max_num_batched_tokens=cfg.prefill.step_token_budget,
            max_waiting=cfg.router.max_queued_requests,
        )
        return EngineConfig(
            block_size=d.block_size,
            kv_cache_bytes=cfg.prefill.kv_cache_bytes,
            max_model_len=cfg.model.max_model_len,
            scheduler=sched,
        )
    sched = SchedulerConfig(
        max_num_seqs=d.max_running_requests, max_waiting=cfg.router.max_queued_requests
    )
    return EngineConfig(
        block_size=d.block_size,
        num_kv_blocks=d.kv_blocks,
        kv_cache_bytes=d.kv_cache_bytes,
        max_model_len=cfg.model.max_model_len,
        scheduler=sched,
    )


class _RankServer:
    """One rank as a Serve replica: joins its gang, runs the rank, reports its status."""

    stage = ""

    def __init__(self, args: dict[str, Any]) -> None:
        cfg = ClusterConfig.from_args(args)
        stage_cfg: PrefillConfig | DecodeConfig = getattr(cfg, self.stage)
        ctx = serve.get_replica_context()
        gang = ctx.gang_context
        replica_id = ctx.replica_id.unique_id
        # no gang context (gang scheduling off): a one-rank gang of its own
        gang_id, rank, world = (
            (gang.gang_id, gang.rank, gang.world_size) if gang else (replica_id, 0, 1)
        )
        gang_id = f"{self.stage}-{gang_id}"
        self._registry = registry(ctx.app_name or APP_NAME)
        init = gang_init_method(self._registry, gang_id, rank)
        member = GangMember(gang_id, rank, world, replica_id, init)
        on_gpu = stage_cfg.num_gpus_per_rank > 0
        self.rank = _RANK_CLASSES[self.stage](
            cfg.model.path,
            member,
            dtype=cfg.model.dtype,
            engine_config=engine_config(cfg, self.stage),
            threads=stage_cfg.torch_threads or max(1, int(stage_cfg.num_cpus_per_rank)),
            device="cuda" if on_gpu else "cpu",
        )
        self._metrics = RankMetrics()
        self._leave_timeout_s = cfg.router.request_timeout_s
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report, name="status-report", daemon=True)
        self._reporter.start()

    def _report(self) -> None:
        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                status = self.rank.status()
                self._metrics.update(status)
                self._registry.report.remote(status)
            except Exception as e:  # the registry is gone (app shutting down): stop reporting
                log.warning("status report failed: %r", e)
                return

    # Serve polls these often: they read the engine counters of the last step (cheap), not the
    # full status (expert load, tokens/s), which only the reporter thread builds.
    def record_routing_stats(self) -> dict[str, Any]:
        s = self.rank.loop.stats()
        return {
            "queued_prompt_tokens": s.num_queued_prompt_tokens,
            "kv_blocks_used": s.kv_blocks_used,
            "kv_blocks_total": s.kv_blocks_total,
            "running_requests": s.num_requests,
            "time_s": time.time(),
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The stage autoscaling signals (cluster/autoscale.py) of this rank."""
        s = self.rank.loop.stats()
        return {"queued_prompt_tokens": float(s.num_queued_prompt_tokens), "kv_usage": s.kv_usage}

    def check_health(self) -> None:
        self.rank.check_health()

    def __del__(self) -> None:
        """Serve's graceful shutdown (scale-down, redeploy, app deleted) ends here once this
        replica's own requests are done; the rank keeps stepping with its gang until every rank
        of the gang is shutting down, so a peer's in-flight streams finish."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self._registry.forget.remote(self.rank.member.replica_id, self.rank.member.gang_id)
        try:
            self.rank.close(timeout_s=self._leave_timeout_s, graceful=True)
        except TimeoutError:
            log.warning("gang peers still serving after %s s; leaving", self._leave_timeout_s)


class PrefillServer(_RankServer):
    stage = "prefill"

    async def prefill(self, job: PrefillJob) -> PrefillResult:
        rank = self.rank
        assert isinstance(rank, PrefillRank)
        first, handoff = await rank.prefill(job)
        # the KV goes into this node's object store; the decode rank pulls it by reference
        return PrefillResult(first, [ray.put(handoff)] if handoff is not None else [])


class DecodeServer(_RankServer):
    stage = "decode"

    async def decode(self, job: DecodeJob) -> AsyncIterator[Chunk]:
        rank = self.rank
        assert isinstance(rank, DecodeRank)
        handoff = await job.handoff[0]
        async for chunk in rank.decode(handoff):
            yield chunk


class RouterServer(InferenceServicer):
    def __init__(self, prefill: Any, decode: Any, args: dict[str, Any]) -> None:
        cfg = ClusterConfig.from_args(args)
        model_cfg = load_config(cfg.model.path)
        max_len = cfg.model.max_model_len or int(model_cfg.max_position_embeddings)
        reg = registry(serve.get_replica_context().app_name or APP_NAME)

        async def cluster_status() -> list:
            return await reg.snapshot.remote()

        r = cfg.router
        super().__init__(
            prefill,
            decode,
            tokenizer=load_tokenizer(cfg.model.path),
            limits=PromptLimits(int(model_cfg.vocab_size), max_len, r.max_prompt_tokens),
            model=ModelDescription(
                architecture=str(model_cfg.model_type),
                model_path=cfg.model.path,
                vocab_size=int(model_cfg.vocab_size),
                max_model_len=max_len,
                num_experts=num_routed_experts(model_cfg),
                num_layers=int(model_cfg.num_hidden_layers),
                dtype=cfg.model.dtype,
            ),
            settings=RouterSettings(
                auth_tokens=tuple(r.auth_tokens),
                max_inflight=r.max_queued_requests,
                request_timeout_s=r.request_timeout_s,
                stop_limits=StopLimits(r.max_stop_strings, r.max_stop_string_chars),
            ),
            cluster_status=cluster_status,
            metrics=RouterMetrics(),
        )


def _stage_options(cfg: ClusterConfig, stage: str, request_router: str) -> dict[str, Any]:
    s: PrefillConfig | DecodeConfig = getattr(cfg, stage)
    max_ongoing = (
        cfg.router.max_queued_requests
        if stage == "prefill"
        else cfg.decode.max_running_requests + cfg.router.max_queued_requests
    )
    options: dict[str, Any] = {
        "name": f"{stage.capitalize()}Rank",
        "ray_actor_options": {"num_cpus": s.num_cpus_per_rank, "num_gpus": s.num_gpus_per_rank},
        "gang_scheduling_config": {
            "gang_size": s.gang_size,
            "gang_placement_strategy": s.placement_strategy,
        },
        "max_ongoing_requests": max_ongoing,
        "request_router_config": {
            "request_router_class": request_router,
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
            "request_router_kwargs": {"block_size": cfg.decode.block_size},
        },
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": cfg.router.request_timeout_s + GRACEFUL_MARGIN_S,
    }
    if s.autoscaling is None:
        options["num_replicas"] = s.num_replicas
    else:  # whole gangs: Serve rounds the policy's rank count up to a multiple of gang_size
        a = s.autoscaling
        metric, target = (
            ("queued_prompt_tokens", float(a.target_queued_prompt_tokens))
            if isinstance(a, PrefillAutoscaling)
            else ("kv_usage", float(a.target_kv_usage))  # type: ignore[union-attr]
        )
        options["autoscaling_config"] = {
            "min_replicas": a.min_gangs * s.gang_size,
            "max_replicas": a.max_gangs * s.gang_size,
            "initial_replicas": s.num_replicas,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "policy": {
                "policy_function": "cluster.autoscale:StageAutoscalingPolicy",
                "policy_kwargs": {"metric": metric, "target": target},
            },
        }
    return options


def build_app(args: dict[str, Any] | ClusterConfig) -> serve.Application:
    """The application for `serve.run` / `serve run cluster.app:build_app` / serveConfigV2."""
    cfg = ClusterConfig.from_args(args)
    plain = cfg.to_args()
    prefill = serve.deployment(
        **_stage_options(cfg, "prefill", "router.balancing:PrefillRequestRouter")
    )(PrefillServer)
    decode = serve.deployment(
        **_stage_options(cfg, "decode", "router.balancing:DecodeRequestRouter")
    )(DecodeServer)
    router = serve.deployment(
        name="Router",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=cfg.router.max_queued_requests + 1,
    )(RouterServer)
    return router.bind(prefill.bind(plain), decode.bind(plain), plain)
