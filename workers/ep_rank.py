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

__all__ = ["ExpertParallelRank", "expert_slices", "num_routed_experts"]

_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def num_routed_experts(config) -> int:
    for key in _EXPERT_COUNT_KEYS:
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"config has none of {', '.join(_EXPERT_COUNT_KEYS)}: not an MoE checkpoint")


def expert_slices(num_experts: int, world_size: int) -> torch.Tensor:
    """Contiguous placement: expert e lives on rank e // (E / N). Returns [E] int64 ranks."""
    if num_experts % world_size:
        raise ValueError(
            f"an EP size of {world_size} does not divide the {num_experts} routed experts; "
            f"pick an EP size that divides {num_experts}"
        )
    return torch.arange(num_experts) // (num_experts // world_size)


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
        experts_to_rank = expert_slices(num_routed_experts(load_config(model_dir)), world_size)
        owned = torch.nonzero(experts_to_rank == rank).flatten().tolist()
        self.engine = build_engine(
            model_dir, dtype=dtype, owned_experts=owned, config=engine_config, progress=False
        )
        self.engine.model.set_dispatcher(make_dispatcher("all_to_all", experts_to_rank))
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
