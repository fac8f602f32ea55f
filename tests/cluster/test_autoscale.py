"""The stage autoscaling policy as Serve runs it: wrapped by Serve's own gang policy, which
rounds the ranks it asks for up to whole gangs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve._private.gang_scheduling_autoscaling_policy import GangSchedulingAutoscalingPolicy

from cluster.autoscale import StageAutoscalingPolicy, desired_ranks


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """No Ray needed: the policy runs on plain context objects."""
    yield


def _ctx(metric: str, per_rank: list[float], current: int, now: float, state=None, hi=8):
    return SimpleNamespace(
        aggregated_metrics={metric: {f"r{i}": v for i, v in enumerate(per_rank)}},
        target_num_replicas=current,
        capacity_adjusted_min_replicas=2,
        capacity_adjusted_max_replicas=hi,
        policy_state=state or {},
        current_time=now,
        config=SimpleNamespace(min_replicas=2),
    )


def test_desired_ranks_bring_the_average_to_the_target():
    assert desired_ranks({"a": 3000, "b": 1000}, 1000, 1, 16) == 4
    assert desired_ranks({"a": 0.9, "b": 0.9}, 0.6, 1, 16) == 3
    assert desired_ranks({}, 0.6, 2, 16) == 2  # no reports yet: the minimum
    assert desired_ranks({"a": 50.0}, 1.0, 1, 16) == 16  # capped


def test_decode_scales_up_in_whole_gangs_at_once():
    policy = GangSchedulingAutoscalingPolicy(StageAutoscalingPolicy("kv_usage", 0.6), 2)
    n, _ = policy(_ctx("kv_usage", [0.9, 0.9], current=2, now=0.0))
    assert n == 4  # 3 ranks wanted -> 2 gangs of 2
    n, _ = policy(_ctx("kv_usage", [0.9, 0.9, 0.2, 0.2], current=4, now=1.0))
    assert n == 4  # 3.7 ranks -> still 2 gangs


def test_scale_down_asks_for_fewer_whole_gangs():
    policy = GangSchedulingAutoscalingPolicy(
        StageAutoscalingPolicy("queued_prompt_tokens", 1000), 2
    )
    n, _ = policy(_ctx("queued_prompt_tokens", [0, 0, 0, 0], current=4, now=0.0))
    assert n == 2  # down to the minimum (Serve's downscale delay applies on top)
    n, _ = policy(_ctx("queued_prompt_tokens", [5000, 0], current=2, now=1.0))
    assert n == 6  # a burst: 5 ranks -> 3 gangs


def test_bad_policy_kwargs_are_refused():
    with pytest.raises(ValueError, match="metric"):
        StageAutoscalingPolicy("gpu_temp", 1.0)
    with pytest.raises(ValueError, match="target"):
        StageAutoscalingPolicy("kv_usage", 0)
