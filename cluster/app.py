"""`build_app(args)`: the whole Serve application from one `ClusterConfig` (the single
`import_path` of `serve run`, the Serve YAML and the RayService `serveConfigV2`).

Three deployments:
- `PrefillRank` and `DecodeRank`: one replica per rank, gang-scheduled (gang size = the
  expert-parallel size, PACK or SPREAD); a gang is one torch.distributed group whose ranks meet
  through the application's registry (`cluster/registry.py`, in GCS). Scaling is in whole gangs.
- `Router`: the front door. It serves `moe.v1.Inference` on `router.port` itself
  (`router/server.py`, on the head node; Serve's gRPC proxy is not used), is the application's
  HTTP ingress for the OpenAI-compatible API (`router/openai_api/`, behind Serve's HTTP proxy on
  `router.http_port`; a plain replica when that is null) and reaches the ranks
  over one channel per rank (`router/channels.py`), not through Serve handles: it learns where
  they listen from the registry, balances each stage itself and migrates requests.

The wrappers here stay thin: a rank is `workers.rank`, the API is `router.servicer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import ray
from ray import serve

from cluster.config import ClusterConfig, DecodeConfig, PrefillAutoscaling, PrefillConfig
from cluster.metrics import METRICS_PERIOD_S, RankMetrics
from cluster.registry import (
    REPORT_PERIOD_S,
    RankListing,
    RankPublisher,
    forget_rank,
    gang_init_method,
    list_ranks,
)
from cluster.wire_key import wire_key
from router.channels import RankDirectory
from router.metrics import RouterMetrics
from router.openai_api import OpenAIFrontend, openai_ingress
from router.openai_api.direct import HttpFrontDoor
from router.openai_api.http import openai_app
from router.requests import StopLimits
from router.server import GrpcFrontDoor
from router.servicer import InferenceServicer, ModelDescription, RouterSettings
from workers.engine import EngineConfig, SchedulerConfig
from workers.engine.build import load_tokenizer
from workers.engine.inputs import PromptLimits
from workers.ep_rank import num_routed_experts
from workers.loader import load_config
from workers.messages import RankAddress
from workers.rank import GangMember, start_rank

__all__ = ["APP_NAME", "build_app", "engine_config"]

log = logging.getLogger("moe_cluster")
APP_NAME = "moe-cluster"
# A rank being scaled away drains first: Serve waits for its destructor up to
# graceful_shutdown_timeout_s = router.drain_grace_s + this margin, then force-kills.
GRACEFUL_MARGIN_S = 30.0
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's built-in resource of the head node
ROUTER_SPARE_REQUESTS = 64  # HTTP calls past the admission limit: rejected by us, not queued


def engine_config(cfg: ClusterConfig, stage: str) -> EngineConfig:
    """The per-rank engine settings of a stage. Prefill ranks hold a prompt's KV only until the
    handoff; they use the decode stage's block size so a handoff maps block for block."""
    d = cfg.decode
    if stage == "prefill":
        sched = SchedulerConfig(
            max_num_batched_tokens=cfg.prefill.step_token_budget,
            max_waiting=cfg.router.max_queued_requests,
            max_prefill_chunk=cfg.prefill.max_prefill_chunk,
        )
        return EngineConfig(
            block_size=d.block_size,
            kv_cache_bytes=cfg.prefill.kv_cache_bytes,
            max_model_len=cfg.model.max_model_len,
            scheduler=sched,
            prefix_caching=cfg.prefix_caching,
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
        prefix_caching=cfg.prefix_caching,
    )


class _RankServer:
    """One rank as a Serve replica: joins its gang, serves channels, publishes its address."""

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
        self._app = ctx.app_name or APP_NAME
        member = GangMember(self.stage, f"{self.stage}-{gang_id}", rank, world, replica_id)
        on_gpu = stage_cfg.num_gpus_per_rank > 0
        self.serving = start_rank(
            cfg.model.path,
            member,
            host=ray.util.get_node_ip_address(),
            wire_key=wire_key(self._app),
            init_method=gang_init_method(self._app, member.gang_id, rank),
            dtype=cfg.model.dtype,
            engine_config=engine_config(cfg, self.stage),
            threads=stage_cfg.torch_threads or max(1, int(stage_cfg.num_cpus_per_rank)),
            device="cuda" if on_gpu else "cpu",
            collective_timeout_s=stage_cfg.collective_timeout_s,
            dispatch_transport=stage_cfg.dispatch_transport,
            core_turn=self._app if cfg.takes_core_turns(self.stage) else None,  # per node
            niceness=stage_cfg.niceness,
        )
        self._metrics = RankMetrics()
        self._grace_s = cfg.router.drain_grace_s
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report, name="rank-report", daemon=True)
        self._reporter.start()

    def _report(self) -> None:
        """Publish where this rank listens every REPORT_PERIOD_S and update the metrics every
        METRICS_PERIOD_S."""
        publisher, metrics_at = RankPublisher(self._app), 0.0
        while not self._stop.wait(REPORT_PERIOD_S):
            try:
                publisher.publish(self.serving.address)
                status = self.serving.rank.snapshot.status
                if status is not None and time.monotonic() - metrics_at >= METRICS_PERIOD_S:
                    metrics_at = time.monotonic()
                    self._metrics.update(status)
            except Exception as e:  # keep trying: GCS comes back
                log.warning("rank report failed: %r", e)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The stage autoscaling signals (cluster/autoscale.py) of this rank."""
        load = self.serving.rank.snapshot.load
        return {"queued_prompt_tokens": float(load.queued_prompt_tokens), "kv_usage": load.kv_usage}

    def check_health(self) -> None:
        self.serving.rank.check_health()

    def drain(self) -> int:
        """Stop admitting; the requests held finish within drain_grace_s, then migrate.
        Returns the requests still held."""
        self.serving.rank.drain(self._grace_s)
        return self.serving.rank.num_held

    def __del__(self) -> None:
        """Serve's graceful shutdown (scale-down, redeploy, app deleted): drain (in-flight
        requests finish within drain_grace_s, the rest migrate to other ranks), then leave the
        gang together with its peers."""
        self._stop.set()
        rank = self.serving.rank
        with contextlib.suppress(Exception):
            # the gang is leaving: its rendezvous goes too
            forget_rank(self._app, self.serving.address, gang_leaving=True)
        rank.drain(self._grace_s)
        deadline = time.monotonic() + self._grace_s + 5
        while rank.num_held and time.monotonic() < deadline and rank.failed is None:
            time.sleep(0.05)  # waiting for the loop thread's requests to end; bounded
        try:
            self.serving.close(timeout_s=self._grace_s + GRACEFUL_MARGIN_S, graceful=True)
        except TimeoutError:
            log.warning("gang peers still serving after the drain grace; leaving")


class PrefillServer(_RankServer):
    stage = "prefill"


class DecodeServer(_RankServer):
    stage = "decode"


class RouterServer:
    """The gRPC front door as a Serve replica: serves `moe.v1.Inference` on `router.port` itself
    (`router/server.py`; no Serve proxy hop) and runs every request over the rank channels.
    Serve starts, health-checks, scales and replaces it; on shutdown it stops admitting and lets
    the streams in progress finish for up to `router.drain_grace_s`."""

    def __init__(self, prefill: Any, decode: Any, args: dict[str, Any]) -> None:
        cfg = ClusterConfig.from_args(args)
        model_cfg = load_config(cfg.model.path)
        max_len = cfg.model.max_model_len or int(model_cfg.max_position_embeddings)
        ctx = serve.get_replica_context()
        app = ctx.app_name or APP_NAME
        peer_id = f"router-{ctx.replica_id.unique_id}"
        r = cfg.router
        key = wire_key(app)
        directories: list[RankDirectory] = []
        listing = RankListing()

        async def live_ranks() -> list[RankAddress]:  # GCS calls block: off the event loop
            return await asyncio.to_thread(list_ranks, app, listing)

        def directory() -> RankDirectory:  # made on the front door's event loop
            if not directories:
                directories.append(
                    RankDirectory(
                        live_ranks,
                        peer_id,
                        key,
                        block_size=cfg.decode.block_size,
                        rank_timeout_s=r.rank_timeout_s,
                        refresh_s=REPORT_PERIOD_S,
                        cache_aware=r.prefill_policy == "cache_aware",
                    ).start()
                )
            return directories[0]

        self.servicer = InferenceServicer(
            directory,
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
                max_migrations=r.max_migrations,
                max_prompt_bytes=r.max_prompt_bytes,
                drain_grace_s=r.drain_grace_s,
                stream_interval=r.stream_interval,
            ),
            metrics=RouterMetrics(),
        )
        self._grace_s = r.drain_grace_s
        self.front_door = GrpcFrontDoor(
            self.servicer,
            port=r.port,
            max_message_bytes=r.max_message_bytes,
            on_loop_start=directory,  # channels open before the first request
        ).start()
        # The OpenAI HTTP API runs each request through the same servicer, on the gRPC server's
        # loop (relayed: one task there owns the request's stream): behind Serve's proxy
        # (build_app makes this class Serve's HTTP ingress) from Serve's loop; served by this
        # replica itself (http_server: router, or auto without Serve's proxy on the port) from
        # the same loop.
        proxy_port = _serve_proxy_port() if r.http_port is not None else None
        if (clash := r.http_port_clash(proxy_port)) is not None:
            raise ValueError(clash)
        direct = r.serves_http_itself(proxy_port)

        created = int(time.time())  # the model's creation time in /v1/models, either path

        def frontend(watch_disconnect: bool) -> OpenAIFrontend:
            return OpenAIFrontend(
                self.servicer,
                self.front_door.relay,
                served_name=cfg.model.name,
                created=created,
                watch_disconnect=watch_disconnect,
                max_body_bytes=r.max_message_bytes,
            )

        self.openai = frontend(False)  # behind Serve's proxy, which cancels on disconnect
        self.http: HttpFrontDoor | None = None
        if direct:
            assert r.http_port is not None
            own = frontend(True)  # uvicorn does not cancel a handler not yet streaming
            door = HttpFrontDoor(openai_app(lambda: own), host="0.0.0.0", port=r.http_port)
            self.http = self.front_door.run(door.start(), timeout_s=60)
        log.info("OpenAI API on :%s served by %s", r.http_port, "the Router" if direct else "Serve")

    def check_health(self) -> None:
        if not self.front_door.alive():
            raise RuntimeError("the Router's gRPC server stopped")
        if self.http is not None and not self.http.alive():
            raise RuntimeError("the Router's HTTP server stopped")

    def __del__(self) -> None:
        """Serve's graceful shutdown: no new calls; those in progress get the drain grace."""
        if self.http is not None:
            with contextlib.suppress(Exception):
                self.front_door.run(self.http.stop(self._grace_s), timeout_s=self._grace_s + 10)
        self.front_door.stop(self._grace_s)


def _serve_proxy_port() -> int | None:
    """The port Serve's HTTP proxies listen on; None when they are off or Serve cannot say."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return None
        location = ray.get(client._controller.get_proxy_location.remote(), timeout=10)
        if location is None or getattr(location, "value", location) == "Disabled":
            return None
        return int(client.http_config.port)
    except Exception as e:  # a Serve without these internals: the check is skipped
        log.warning("could not read Serve's HTTP proxy port: %r", e)
        return None


def _stage_options(cfg: ClusterConfig, stage: str) -> dict[str, Any]:
    s: PrefillConfig | DecodeConfig = getattr(cfg, stage)
    options: dict[str, Any] = {
        "name": f"{stage.capitalize()}Rank",
        "ray_actor_options": {"num_cpus": s.num_cpus_per_rank, "num_gpus": s.num_gpus_per_rank},
        "gang_scheduling_config": {
            "gang_size": s.gang_size,
            "gang_placement_strategy": s.placement_strategy,
        },
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
        # requests reach ranks over their channels, not through Serve: Serve's own wait for
        # ongoing requests is skipped and the replica's destructor drains (see __del__)
        "graceful_shutdown_wait_loop_s": 0.1,
        "graceful_shutdown_timeout_s": cfg.router.drain_grace_s + GRACEFUL_MARGIN_S,
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
    prefill = serve.deployment(**_stage_options(cfg, "prefill"))(PrefillServer)
    decode = serve.deployment(**_stage_options(cfg, "decode"))(DecodeServer)
    router = serve.deployment(
        name="Router",
        num_replicas=1,
        # on the head node: its port is the cluster's gRPC endpoint (the head Service's target)
        ray_actor_options={"num_cpus": 0.1, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        # HTTP requests reach the Router through Serve, which queues past this many per replica
        # (default 5): admission is the servicer's (429 with its sentence past the limit)
        max_ongoing_requests=cfg.router.max_queued_requests + ROUTER_SPARE_REQUESTS,
        health_check_period_s=2.0,
        graceful_shutdown_wait_loop_s=0.1,
        graceful_shutdown_timeout_s=cfg.router.drain_grace_s + GRACEFUL_MARGIN_S,
    )(openai_ingress(RouterServer) if cfg.router.http_via_serve else RouterServer)
    return router.bind(prefill.bind(plain), decode.bind(plain), plain)
