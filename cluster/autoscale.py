"""Autoscaling the stages in whole gangs from their own load signals (Serve custom policy).

- prefill: queued prompt tokens per rank toward `target_queued_prompt_tokens`;
- decode: KV usage per rank toward `target_kv_usage`.

Every rank reports both signals through `record_autoscaling_stats`; Serve aggregates them over
its look-back window and calls `StageAutoscalingPolicy` with them. The policy asks for the ranks
that bring the average to the target; Serve's gang wrapper rounds that up to whole gangs, so a
gang is added or removed as a unit. Serve applies the stage's `upscale_delay_s` and
`downscale_delay_s` (a lower count must be asked for that long before a gang goes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["METRICS", "StageAutoscalingPolicy", "desired_ranks"]

METRICS = ("queued_prompt_tokens", "kv_usage")
log = logging.getLogger("ray.serve")


def desired_ranks(per_rank: Mapping[Any, float], target: float, lo: int, hi: int) -> int:
    """Ranks needed so that the summed signal averages `target` per rank, within [lo, hi]."""
    need = math.ceil(sum(per_rank.values()) / target) if per_rank else lo
    return max(lo, min(hi, need))


class StageAutoscalingPolicy:
    """Serve autoscaling policy (class form: Serve builds it once with `policy_kwargs`). Serve
    wraps it with the deployment's min/max replicas and upscale/downscale delays."""

    def __init__(self, metric: str, target: float) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r} is not one of {METRICS}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        self.metric, self.target = metric, target

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        current = ctx.target_num_replicas
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        per_rank = (ctx.aggregated_metrics or {}).get(self.metric, {})
        want = desired_ranks(per_rank, self.target, lo, hi)
        if want != current:
            log.info(
                "%s: %d ranks wanted (summed %.3g over %d reports, target %g), %d now",
                self.metric, want, sum(per_rank.values()), len(per_rank), self.target, current,
            )  # fmt: skip
        return want, dict(ctx.policy_state or {})
