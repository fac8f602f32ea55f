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

Ray's token authentication is on for the embedded Ray (`RAY_AUTH_MODE=token` unless the
environment says otherwise; Ray makes ~/.ray/auth_token when there is none) and for a cluster
joined with `join_ray` whenever a token is at hand (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
~/.ray/auth_token): a driver joining by address does not turn it on by itself, and its workers
then fail to join. The rank wire's key derives from the same token (cluster/wire_key.py).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["RAY_ENV", "join_ray", "start_embedded_ray"]

AUTH_MODE = "RAY_AUTH_MODE"

RAY_ENV: dict[str, str] = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_worker_niceness": "0"}


def start_embedded_ray(**kwargs: Any) -> None:
    """`ray.init` of a new local instance; `kwargs` go to `ray.init` (num_cpus, dashboard, ...)."""
    import ray

    for name, value in RAY_ENV.items():  # Ray's processes inherit this process's environment
        os.environ.setdefault(name, value)
    if AUTH_MODE not in os.environ:
        _token_auth_on()
    kwargs.setdefault("log_to_driver", False)
    ray.init(address="local", **kwargs)


def join_ray(address: str) -> None:
    """`ray.init(address)` of a running cluster, with Ray's token auth on when a token is at
    hand and RAY_AUTH_MODE does not say otherwise. RuntimeError with what to set when the
    cluster wants a token this process lacks."""
    import ray
    from ray.exceptions import AuthenticationError

    if AUTH_MODE not in os.environ:
        try:
            from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

            if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
                _token_auth_on()
        except ImportError:  # a Ray without token auth
            pass
    try:
        ray.init(address=address, log_to_driver=False)
    except AuthenticationError:
        raise RuntimeError(
            f"the Ray cluster at {address} requires Ray's auth token: set RAY_AUTH_MODE=token "
            "and the cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or "
            "~/.ray/auth_token)"
        ) from None


def _token_auth_on() -> None:
    """RAY_AUTH_MODE=token for this process and the Ray processes it starts."""
    os.environ[AUTH_MODE] = "token"
    try:  # Ray caches its config at import: read the environment again
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")
    except ImportError:
        pass
