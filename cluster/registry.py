"""`GangRegistry`: one small named Ray actor per application that
- lets a gang's ranks meet: rank 0 publishes `tcp://<node ip>:<port>` for torch.distributed
  under the gang id, the others wait for it (bounded);
- holds every rank's latest `RankStatus` for GetClusterStatus (ranks report every
  `REPORT_PERIOD_S`; a rank that stops reporting drops out after `STALE_AFTER_S`).

Detached so that it outlives whichever replica created it; `moe-cluster serve` and the test
fixtures remove it with the application (`drop_registry`).
"""

from __future__ import annotations

import contextlib
import time

import ray

from cluster.net import free_port
from workers.messages import RankStatus

__all__ = [
    "REPORT_PERIOD_S",
    "gang_init_method",
    "drop_registry",
    "registry",
]

NAMESPACE = "moe-cluster"
REPORT_PERIOD_S = 0.5
STALE_AFTER_S = 10.0


@ray.remote(num_cpus=0)
class GangRegistry:
    def __init__(self) -> None:
        self._addresses: dict[str, str] = {}
        self._status: dict[str, RankStatus] = {}  # replica id -> latest report
        self._seen: dict[str, float] = {}  # replica id -> monotonic time of that report

    def publish_address(self, gang_id: str, address: str) -> None:
        self._addresses[gang_id] = address

    def address(self, gang_id: str) -> str | None:
        return self._addresses.get(gang_id)

    def report(self, status: RankStatus) -> None:
        self._status[status.replica_id] = status
        self._seen[status.replica_id] = time.monotonic()

    def forget(self, replica_id: str, gang_id: str | None = None) -> None:
        self._status.pop(replica_id, None)
        self._seen.pop(replica_id, None)
        if gang_id is not None:
            self._addresses.pop(gang_id, None)

    def snapshot(self) -> list[RankStatus]:
        now = time.monotonic()
        for rid in [r for r, t in self._seen.items() if now - t > STALE_AFTER_S]:
            self.forget(rid)
        return list(self._status.values())


def registry(app_name: str):
    """The application's registry actor, created by whoever asks first."""
    return GangRegistry.options(  # type: ignore[attr-defined]
        name=f"registry-{app_name}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def drop_registry(app_name: str) -> None:
    with contextlib.suppress(ValueError):  # ValueError: never created
        ray.kill(ray.get_actor(f"registry-{app_name}", namespace=NAMESPACE))


def gang_init_method(reg, gang_id: str, rank: int, timeout_s: float = 120.0) -> str:
    """torch.distributed init method for a gang: rank 0 picks a port on its node and publishes
    it; the other ranks wait for it, raising TimeoutError after `timeout_s`."""
    if rank == 0:
        host = ray.util.get_node_ip_address()
        address = f"tcp://{host}:{free_port(host)}"
        ray.get(reg.publish_address.remote(gang_id, address), timeout=timeout_s)
        return address
    deadline = time.monotonic() + timeout_s
    wait = 0.01
    while (left := deadline - time.monotonic()) > 0:
        address = ray.get(reg.address.remote(gang_id), timeout=left)
        if address is not None:
            return address
        time.sleep(min(wait, left))  # polling another process's state, not synchronizing tests
        wait = min(wait * 2, 0.5)
    raise TimeoutError(f"rank 0 of gang {gang_id} did not publish its address in {timeout_s} s")
