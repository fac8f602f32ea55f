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
import secrets

from workers.wire import WireKey

__all__ = ["ray_token_auth", "wire_key"]

log = logging.getLogger("moe_cluster")
NAMESPACE = b"moe-cluster"  # cluster/registry.py's
GCS_TIMEOUT_S = 10.0
_SECRET_BYTES = 32


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


def _deployment_secret(app: str) -> bytes:
    """`app`'s secret in GCS, made here when it is the first to ask (put without overwrite,
    then read: every process reads the one that won)."""
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    gcs = internal_kv_get_gcs_client()
    if gcs is None:
        raise RuntimeError("the wire key needs a connected Ray (ray.init) in this process")
    key = f"{app}/wire-secret".encode()
    gcs.internal_kv_put(key, secrets.token_bytes(_SECRET_BYTES), False, NAMESPACE, GCS_TIMEOUT_S)
    secret = gcs.internal_kv_get(key, NAMESPACE, GCS_TIMEOUT_S)
    if secret is None or len(secret) != _SECRET_BYTES:
        raise RuntimeError(f"the wire secret of {app!r} in GCS is missing or damaged")
    return bytes(secret)


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
    return WireKey(_deployment_secret(app), context=app)
