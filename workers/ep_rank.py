"""One rank of an expert-parallel group: its own requests and KV cache (attention is data
parallel), a slice of the routed experts, and MoE layers run collectively with the other ranks.

A plain class: `cluster/` wraps it as a Ray actor (offline `--ep N`) or a Serve replica.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from workers.cores import pin_rank
from workers.engine import EngineConfig, EngineStats, RequestOutput, SamplingParams
from workers.engine.build import build_engine
from workers.engine.lockstep import Lockstep
from workers.loader import load_config
from workers.moe.dispatch import AllToAllDispatcher, make_dispatcher
from workers.moe.placement import Placement, contiguous_placement
from workers.moe.rebalance import (
    RebalanceReport,
    apply_placements,
    current_placements,
    rebalance_from_load,
)

__all__ = ["BACKENDS", "ExpertParallelRank", "num_routed_experts", "resolve_backend"]

BACKENDS = ("auto", "gloo", "nccl")

_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def num_routed_experts(config) -> int:
    for key in _EXPERT_COUNT_KEYS:
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"config has none of {', '.join(_EXPERT_COUNT_KEYS)}: not an MoE checkpoint")


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The process-group backend for a model on `device`: "auto" is NCCL when CUDA is available
    and the model is on a CUDA device, else gloo. "nccl" on a CPU model is refused (NCCL moves
    only CUDA tensors); "gloo" is always allowed (slow on CUDA: tensors go through the host)."""
    if backend not in BACKENDS:
        choices = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"backend={backend!r} is not supported; choose one of {choices}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "nccl" if on_cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not (on_cuda and torch.cuda.is_available()):
        raise ValueError(
            f"backend='nccl' needs the model on an available CUDA device, but device={device!r} "
            f"(CUDA available: {torch.cuda.is_available()}); use backend='gloo' or 'auto' on CPU"
        )
    return backend


class ExpertParallelRank:
    """One rank of the group. Collective methods (`generate`, `rebalance`, `apply_placements`)
    must be called on every rank with the same arguments apart from `generate`'s requests."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        rank: int,
        world_size: int,
        init_method: str,
        dtype: str = "float32",
        engine_config: EngineConfig | None = None,
        threads: int = 1,
        timeout_s: float = 120.0,
        collective_timeout_s: float | None = None,
        device: str = "cpu",
        backend: str = "auto",
        num_redundant: int | None = None,
        load_window: int = 128,
        pin_cores: bool = False,
        dispatch_transport: str = "auto",
    ) -> None:
        if pin_cores:  # before the group starts its gloo threads: they inherit the cores
            pin_rank(rank, threads)
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.backend = resolve_backend(backend, device)
        dist.init_process_group(
            self.backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # Contiguous slots to start; `num_redundant` None: when the EP size does not divide the
        # expert count, the fewest redundant slots that give every rank the same number.
        self.placement = contiguous_placement(
            num_routed_experts(load_config(model_dir)), world_size, num_redundant
        )
        self.engine = build_engine(
            model_dir,
            dtype=dtype,
            config=engine_config,
            device=device,
            progress=False,
            shard=(self.placement, rank),
        )
        # The slot -> rank table depends only on the slot count and the group size, so it stays
        # valid across rebalances (they keep both): one dispatcher for the group's lifetime.
        slot_to_rank = self.placement.tables().slot_to_rank
        # 1 rank: local; CPU ranks on one host: rows through shared memory (a collective here)
        self.dispatcher = make_dispatcher("auto", slot_to_rank, transport=dispatch_transport)
        self.engine.model.set_dispatcher(self.dispatcher)
        self.load = self.engine.model.track_expert_load(load_window)  # this rank's tokens only
        shm = self.dispatcher.shm if isinstance(self.dispatcher, AllToAllDispatcher) else None
        self.lockstep = Lockstep(self.engine, exchange=shm)
        self.rebalances: list[RebalanceReport] = []
        if collective_timeout_s is not None:
            # joining and loading may wait long for slow peers (timeout_s); once every rank has
            # loaded, a collective that waits this long means a stuck peer: fail fast instead
            dist.barrier()
            set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
            if set_timeout is not None:
                set_timeout(datetime.timedelta(seconds=collective_timeout_s))
            if isinstance(self.dispatcher, AllToAllDispatcher):
                self.dispatcher.set_timeout(collective_timeout_s)

    def ready(self) -> int:
        """Returns this rank once construction (group join, weight loading) is done."""
        return self.rank

    def generate(
        self,
        requests: Sequence[tuple[str, str | Sequence[int], SamplingParams]],
        rebalance_every: int | None = None,
    ) -> dict[str, RequestOutput]:
        """Run this rank's share of requests to completion in lockstep with the group.
        Collective: every rank of the group calls it (with its own, possibly empty, share) and
        the same `rebalance_every`: rebalance from the observed load after every that many
        group steps (counted since the rank started), None never."""
        if rebalance_every is not None and rebalance_every < 1:
            raise ValueError(f"rebalance_every must be >= 1 or None, got {rebalance_every}")
        for request_id, prompt, params in requests:
            if isinstance(prompt, str):
                self.engine.add_request(request_id, params, prompt=prompt)
            else:
                self.engine.add_request(request_id, params, prompt_token_ids=prompt)
        if rebalance_every is not None:
            every = rebalance_every

            def maybe_rebalance(step: int) -> None:
                if step % every == 0:
                    self.rebalance(step)

            self.lockstep.after_step = maybe_rebalance
        try:
            return {o.request_id: o for o in self.lockstep.run_until_idle()}
        finally:
            self.lockstep.after_step = None

    def rebalance(self, step: int = 0) -> RebalanceReport:
        """Collective, at a step boundary: sum the ranks' load windows, re-place the experts
        with EPLB and move the weights that change ranks. Rank 0 logs the outcome to stderr."""
        layers = self.engine.model.moe_layers()
        report = rebalance_from_load(layers, self.load, self.rank, step=step)
        self.rebalances.append(report)
        if self.rank == 0:
            before, after = sum(report.max_rank_load_before), sum(report.max_rank_load_after)
            print(
                f"[ep rank 0] rebalance after step {step}: max per-rank load {before:.0f} -> "
                f"{after:.0f} (summed over {len(layers)} MoE layers; even split "
                f"{sum(report.mean_rank_load):.0f}), {report.slots_changed} slots changed, "
                f"{report.rows_moved} expert weight rows sent",
                file=sys.stderr,
                flush=True,
            )
        return report

    def apply_placements(self, placements: Sequence[Placement]) -> int:
        """Collective: move every MoE layer to its placement (same list on every rank). Returns
        the expert weight rows sent between ranks."""
        return apply_placements(self.engine.model.moe_layers(), placements, self.rank)

    def placements(self) -> list[Placement]:
        """The placement of every MoE layer now, in forward order."""
        return current_placements(self.engine.model.moe_layers())

    def rebalance_reports(self) -> list[RebalanceReport]:
        """Every rebalance this rank took part in, oldest first (the same on every rank)."""
        return list(self.rebalances)

    def expert_load(self) -> torch.Tensor:
        """[MoE layers, logical experts] int64 on CPU: picks of this rank's own tokens over the
        last `load_window` engine steps."""
        return self.load.totals().cpu()

    def engine_stats(self) -> EngineStats:
        return self.engine.stats()

    def dispatch_bytes(self) -> tuple[int, int]:
        """MoE all-to-all bytes (sent, received) since the rank started. Call it on the thread
        that steps the engine (the counters are written there)."""
        layers = self.engine.model.moe_layers()
        counters = getattr(layers[0], "dispatcher", None) if layers else None
        counters = getattr(counters, "counters", None)
        if counters is None:
            return 0, 0
        total = counters.overall()
        return total.bytes_sent, total.bytes_received

    def dispatch_transport(self) -> str:
        """How this rank's MoE rows travel: "shm" (shared memory), "collective" (the process
        group's all-to-alls) or "local" (a group of one)."""
        if not isinstance(self.dispatcher, AllToAllDispatcher):
            return "local"
        return "shm" if self.dispatcher.shm is not None else "collective"

    def close(self) -> None:
        if isinstance(self.dispatcher, AllToAllDispatcher):
            self.dispatcher.close()  # peers waiting on this rank's rows fail at once
        if dist.is_initialized():
            dist.destroy_process_group()
