"""The embedded Ray: always a new local instance, never a cluster this machine saw before.

`ray.init()` without an address joins `RAY_ADDRESS`, or else the cluster the last `ray start` on
this machine wrote to /tmp/ray/ray_current_cluster, even one long dead (then it fails with
"num_cpus ... must not be provided" or retries a GCS that is gone). `address="local"` starts a new
instance whatever the environment or the temp directory says: what `moe-cluster serve` without
`--address`, the offline EP engine, the benches and the tests mean by "embedded".
"""

from __future__ import annotations

from typing import Any

__all__ = ["start_embedded_ray"]


def start_embedded_ray(**kwargs: Any) -> None:
    """`ray.init` of a new local instance; `kwargs` go to `ray.init` (num_cpus, dashboard, ...)."""
    import ray

    kwargs.setdefault("log_to_driver", False)
    ray.init(address="local", **kwargs)
