"""One rank of an expert-parallel group: its own requests and KV cache (attention is data
parallel), a slice of the routed experts, and MoE layers run collectively with the other ranks.

A plain class: `cluster/` wraps it as a Ray actor (offline `--ep N`) or a Serve replica.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from workers.engine import EngineConfig, RequestOutput, SamplingParams
from workers.engine.build import build_engine
from workers.engine.lockstep import Lockstep
from workers.loader import load_config
from workers.moe.dispatch import make_dispatcher
from workers.moe.placement import contiguous_placement

__all__ = ["ExpertParallelRank", "num_routed_experts"]

_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def num_routed_experts(config) -> int:
    for key in _EXPERT_COUNT_KEYS:
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"config has none of {', '.join(_EXPERT_COUNT_KEYS)}: not an MoE checkpoint")


class ExpertParallelRank:
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
    ) -> None:
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # Contiguous slots; when the EP size does not divide the expert count, the fewest
        # redundant slots that give every rank the same number of slots.
        self.placement = contiguous_placement(
            num_routed_experts(load_config(model_dir)), world_size
        )
        self.engine = build_engine(
            model_dir,
            dtype=dtype,
            config=engine_config,
            progress=False,
            shard=(self.placement, rank),
        )
        slot_to_rank = self.placement.tables().slot_to_rank
        self.engine.model.set_dispatcher(make_dispatcher("all_to_all", slot_to_rank))
        self.lockstep = Lockstep(self.engine)

    def ready(self) -> int:
        """Returns this rank once construction (group join, weight loading) is done."""
        return self.rank

    def generate(
        self, requests: Sequence[tuple[str, str | Sequence[int], SamplingParams]]
    ) -> dict[str, RequestOutput]:
        """Run this rank's share of requests to completion in lockstep with the group.
        Collective: every rank of the group calls it (with its own, possibly empty, share)."""
        for request_id, prompt, params in requests:
            if isinstance(prompt, str):
                self.engine.add_request(request_id, params, prompt=prompt)
            else:
                self.engine.add_request(request_id, params, prompt_token_ids=prompt)
        return {o.request_id: o for o in self.lockstep.run_until_idle()}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
