"""The application's rank-wire key (`workers.wire.WireKey`), the same in every process of one
application and different between applications:
- Ray's token auth on (`RAY_AUTH_MODE=token`: the embedded Ray, `ray start` with it set,
  KubeRay's `authOptions`): derived from Ray's token, as this process's Ray loaded it. Rotating
  Ray's token rotates the wire's.
- Ray's token auth off: a random 32-byte secret made by the first process of the application
  that asks and kept in GCS under `<app>/wire-secret` (gone with the app's registry on
  undeploy). Handed out through Ray like every actor argument; never logged, never in a status.
  Without Ray's auth, anyone who reaches GCS can read it, but could run any code on the cluster
  anyway: token auth is what closes that door (a warning says so).
"""

from __future__ import annotations

import logging

from cluster.registry import deployment_secret
from workers.wire import WireKey

__all__ = ["ray_token_auth", "wire_key"]

log = logging.getLogger("moe_cluster")


def ray_token_auth() -> bool:
    """Whether this process's Ray runs with token authentication."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # a Ray without token auth
        return False
    return bool(is_token_auth_enabled())


def _ray_token() -> bytes:
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]

    token = AuthenticationTokenLoader.instance().get_raw_token()
    if not token:
        raise RuntimeError(
            "Ray's token auth is on but this process has no token: set RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token on every node"
        )
    return token.encode() if isinstance(token, str) else bytes(token)


def wire_key(app: str) -> WireKey:
    """The key every rank port and router of `app` uses (blocking: a GCS call without token
    auth)."""
    if ray_token_auth():
        return WireKey(_ray_token(), context=app)
    log.warning(
        "Ray's token authentication is off: anyone who reaches this cluster's Ray ports can run "
        "code on it. The rank wire uses a per-deployment secret kept in GCS; set "
        "RAY_AUTH_MODE=token on every node (KubeRay: authOptions) to close Ray's ports too."
    )
    return WireKey(deployment_secret(app), context=app)
