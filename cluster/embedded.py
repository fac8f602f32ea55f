"""The embedded Ray: always a new local instance, never a cluster this machine saw before.

`ray.init()` without an address joins `RAY_ADDRESS`, or else the cluster the last `ray start` on
this machine wrote to /tmp/ray/ray_current_cluster, even one long dead (then it fails with
"num_cpus ... must not be provided" or retries a GCS that is gone). `address="local"` starts a new
instance whatever the environment or the temp directory says: what `moe-cluster serve` without
`--address`, the offline EP engine, the benches and the tests mean by "embedded".

`RAY_ENV` is what this project sets for Ray's own processes, here and on the Ray head of the
KubeRay manifests (tests/deploy checks they agree); an operator's value in the environment wins:
- `RAY_SERVE_CONTROL_LOOP_INTERVAL_S` 0.5 (Serve's default 0.1): each pass of Serve's control
  loop fetches every node's info from GCS and deep-copies it; at 10 Hz that is the largest idle
  cost of a cluster (controller 4.5% and GCS 2.4% of a core on a 2-core VM, 1.95% and 1.5% at
  1 s). Serve then notices a replica's state change (started, died) up to 0.5 s later; requests
  never wait on it (the Router reaches ranks over their own channels).
- `RAY_worker_niceness` 0 (Ray's default 15): every Ray worker starts at nice 0, as the raylet
  and GCS run; rank processes then raise their own to their stage's `niceness` (15 by default:
  where Ray would have put them, `workers/cores.py` `set_niceness`). So the serving plane (the
  Router, Serve's controller and proxy) outranks computing ranks on shared cores: a waking
  Router answers at once instead of competing with a rank's step at equal weight. Needed on
  every node that runs a Router or a rank (the KubeRay manifests set it on head and workers).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["RAY_ENV", "start_embedded_ray"]

RAY_ENV: dict[str, str] = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_worker_niceness": "0"}


def start_embedded_ray(**kwargs: Any) -> None:
    """`ray.init` of a new local instance; `kwargs` go to `ray.init` (num_cpus, dashboard, ...)."""
    import ray

    for name, value in RAY_ENV.items():  # Ray's processes inherit this process's environment
        os.environ.setdefault(name, value)
    kwargs.setdefault("log_to_driver", False)
    ray.init(address="local", **kwargs)
