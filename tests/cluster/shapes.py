"""The cluster shape the served-cluster tests deploy: 1 prefill gang x 2 ranks, 2 decode gangs x
2 ranks, small KV blocks so balancing and freeing are visible, CPU ranks that reserve ~nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig

__all__ = ["two_stage_config"]


def two_stage_config(
    model_dir: Path,
    port: int,
    *,
    step_token_budget: int,
    max_prefill_chunk: int = 512,
    **router: Any,
) -> ClusterConfig:
    return ClusterConfig.from_args(
        {
            "model": {"path": str(model_dir)},
            "prefill": {
                "gang_size": 2,
                "num_gangs": 1,
                "step_token_budget": step_token_budget,
                "max_prefill_chunk": max_prefill_chunk,
                "num_cpus_per_rank": 0.01,
                "kv_cache_bytes": 32 << 20,
            },
            "decode": {
                "gang_size": 2,
                "num_gangs": 2,
                "block_size": 4,
                "kv_blocks": 2048,
                "num_cpus_per_rank": 0.01,
            },
            "router": {"port": port, **router},
        }
    )
