"""The application's registry, kept in Ray's GCS key-value store (no actor of its own):
- a gang's ranks meet there: rank 0 publishes `tcp://<node ip>:<port>` for torch.distributed
  under the gang id, the others wait for it (bounded);
- it lists where every serving rank listens for channels (`RankAddress`): ranks re-publish every
  `REPORT_PERIOD_S`, routers poll the list and judge liveness by their own clock
  (`RankListing`): a rank whose entry stopped changing for `STALE_AFTER_S` drops out, and its
  entry is deleted once silent for `FORGET_AFTER_S`.

Keys live in the `moe-cluster` namespace under `<app>/gang/<gang id>` and
`<app>/rank/<replica id>`; values are msgpack in `RankEntry`'s schema (decoded into that type
alone: nothing read from GCS is unpickled). A GCS call that fails raises; the periodic callers
keep trying. Each call is one GCS RPC: no Python process of ours on the path (a registry actor
cost 2-2.5% of a core while idle on a 2-core VM, from its own core worker and task execution
alone).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import msgspec
import ray
from ray.experimental.internal_kv import internal_kv_get_gcs_client

from cluster.net import free_port
from workers.messages import RankAddress

__all__ = [
    "REPORT_PERIOD_S",
    "RankListing",
    "RankPublisher",
    "deployment_secret",
    "drop_registry",
    "forget_rank",
    "gang_init_method",
    "list_ranks",
]

log = logging.getLogger("moe_cluster")
NAMESPACE = b"moe-cluster"
REPORT_PERIOD_S = 0.5
STALE_AFTER_S = 3.0
FORGET_AFTER_S = 30.0
GCS_TIMEOUT_S = 10.0  # one GCS call; a GCS that is restarting answers within it or fails


def _gcs():
    client = internal_kv_get_gcs_client()
    if client is None:
        raise RuntimeError("the registry needs a connected Ray (ray.init) in this process")
    return client


def _key(app: str, kind: str, name: str = "") -> bytes:
    return f"{app}/{kind}/{name}".encode()


@dataclass(frozen=True)
class RankEntry:
    """One rank's registry value."""

    seq: int  # advances with every publish: readers judge liveness by it
    published: float  # the publisher's time.time()
    address: RankAddress


def encode_entry(entry: RankEntry) -> bytes:
    return msgspec.msgpack.encode(entry)


def decode_entry(value: bytes) -> RankEntry | None:
    """The entry, or None (logged) when the value is not one."""
    try:
        return msgspec.msgpack.decode(value, type=RankEntry)
    except msgspec.DecodeError as e:
        log.warning("ignored a registry entry that is not a rank's: %s", e)
        return None


class RankPublisher:
    """A rank's entry: `publish` every REPORT_PERIOD_S; each value carries a sequence number
    that readers watch advance, and the publisher's wall time for a reader's first look."""

    def __init__(self, app: str) -> None:
        self.app = app
        self._seq = 0

    def publish(self, address: RankAddress) -> None:
        self._seq += 1
        value = encode_entry(RankEntry(self._seq, time.time(), address))
        key = _key(self.app, "rank", address.replica_id)
        _gcs().internal_kv_put(key, value, True, NAMESPACE, timeout=GCS_TIMEOUT_S)


def forget_rank(app: str, address: RankAddress, *, gang_leaving: bool = False) -> None:
    """The rank leaves the list now (not after STALE_AFTER_S); with `gang_leaving`, its gang's
    rendezvous address goes too."""
    gcs = _gcs()
    gcs.internal_kv_del(_key(app, "rank", address.replica_id), False, NAMESPACE, GCS_TIMEOUT_S)
    if gang_leaving:
        gcs.internal_kv_del(_key(app, "gang", address.gang_id), False, NAMESPACE, GCS_TIMEOUT_S)


@dataclass
class RankListing:
    """Which published ranks are alive, judged by the reader's clock alone: an entry is live
    while its sequence number advanced within STALE_AFTER_S of this reader's monotonic time. An
    entry seen for the first time is dated by its publisher's wall time (a skewed clock only
    delays it to its next advance). Pure: `update` takes what GCS returned and the clocks."""

    _seen: dict[bytes, tuple[int, float]] = field(default_factory=dict)  # key -> (seq, at)

    def update(
        self, entries: dict[bytes, bytes], now: float, wall_now: float
    ) -> tuple[list[RankAddress], list[bytes]]:
        """-> (the live ranks, the keys silent for FORGET_AFTER_S, to delete)."""
        live: list[RankAddress] = []
        expired: list[bytes] = []
        seen: dict[bytes, tuple[int, float]] = {}
        for key, value in entries.items():
            entry = decode_entry(value)
            if entry is None:
                continue
            seq, published, address = entry.seq, entry.published, entry.address
            before = self._seen.get(key)
            if before is None:
                at = now - max(0.0, wall_now - published)
            else:
                at = now if seq != before[0] else before[1]
            seen[key] = (seq, at)
            if now - at <= STALE_AFTER_S:
                live.append(address)
            elif now - at > FORGET_AFTER_S:
                expired.append(key)
        self._seen = seen  # entries gone from GCS are forgotten here too
        return live, expired


def list_ranks(app: str, listing: RankListing) -> list[RankAddress]:
    """The live ranks of `app` (two GCS calls; blocking: routers run it in a thread)."""
    gcs = _gcs()
    keys = gcs.internal_kv_keys(_key(app, "rank"), NAMESPACE, GCS_TIMEOUT_S)
    entries = gcs.internal_kv_multi_get(keys, NAMESPACE, GCS_TIMEOUT_S) if keys else {}
    live, expired = listing.update(entries, time.monotonic(), time.time())
    for key in expired:  # a rank that died without leaving; any router may sweep it
        gcs.internal_kv_del(key, False, NAMESPACE, GCS_TIMEOUT_S)
    return live


def drop_registry(app: str) -> None:
    """Every entry of `app` (its undeploy)."""
    with contextlib.suppress(Exception):  # no Ray connected: nothing to drop
        _gcs().internal_kv_del(f"{app}/".encode(), True, NAMESPACE, GCS_TIMEOUT_S)


def deployment_secret(app: str, num_bytes: int = 32) -> bytes:
    """`app`'s random secret under `<app>/wire-secret`, made by the first process that asks
    (put without overwrite, then read: every process reads the one that won); `drop_registry`
    removes it with the rest of the app's keys."""
    key = f"{app}/wire-secret".encode()
    gcs = _gcs()
    gcs.internal_kv_put(key, secrets.token_bytes(num_bytes), False, NAMESPACE, GCS_TIMEOUT_S)
    secret = gcs.internal_kv_get(key, NAMESPACE, GCS_TIMEOUT_S)
    if secret is None or len(secret) != num_bytes:
        raise RuntimeError(f"the wire secret of {app!r} in GCS is missing or damaged")
    return bytes(secret)


def gang_init_method(app: str, gang_id: str, rank: int, timeout_s: float = 120.0) -> str:
    """torch.distributed init method for a gang: rank 0 picks a port on its node and publishes
    it; the other ranks wait for it, raising TimeoutError after `timeout_s`."""
    key = _key(app, "gang", gang_id)
    if rank == 0:
        host = ray.util.get_node_ip_address()
        address = f"tcp://{host}:{free_port(host)}"
        _gcs().internal_kv_put(key, address.encode(), True, NAMESPACE, timeout=timeout_s)
        return address
    deadline = time.monotonic() + timeout_s
    wait = 0.01
    while (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(ray.exceptions.RpcError):  # GCS restarting: ask again
            found = _gcs().internal_kv_get(key, NAMESPACE, min(left, GCS_TIMEOUT_S))
            if found is not None:
                return found.decode()
        time.sleep(min(wait, max(left, 0)))  # polling another process's state, bounded
        wait = min(wait * 2, 0.5)
    raise TimeoutError(f"rank 0 of gang {gang_id} did not publish its address in {timeout_s} s")
