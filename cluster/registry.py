"""`GangRegistry`: one small named Ray actor per application that
- lets a gang's ranks meet: rank 0 publishes `tcp://<node ip>:<port>` for torch.distributed
  under the gang id, the others wait for it (bounded);
- lists where every serving rank listens for channels (`RankAddress`): ranks re-publish every
  `REPORT_PERIOD_S`, one silent for `STALE_AFTER_S` drops out, and routers poll the list.

It lives outside every gang's placement group (`scheduling_strategy="DEFAULT"`: an actor made
from inside a gang replica would otherwise be captured by the gang's placement group and die with
it) and holds only soft state: when it is restarted, ranks re-publish within REPORT_PERIOD_S and
callers find the new one by name: `registry()` resolves it (a GCS lookup each time), and the
periodic callers keep a `RegistryClient`, whose handle is resolved again after a call failed.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray

from cluster.net import free_port
from workers.messages import RankAddress

__all__ = ["REPORT_PERIOD_S", "RegistryClient", "drop_registry", "gang_init_method", "registry"]

NAMESPACE = "moe-cluster"
REPORT_PERIOD_S = 0.5
STALE_AFTER_S = 3.0


@ray.remote(num_cpus=0)
class GangRegistry:
    def __init__(self) -> None:
        self._addresses: dict[str, str] = {}
        self._ranks: dict[str, tuple[RankAddress, float]] = {}  # replica id -> (where, seen)

    def publish_address(self, gang_id: str, address: str) -> None:
        self._addresses[gang_id] = address

    def address(self, gang_id: str) -> str | None:
        return self._addresses.get(gang_id)

    def publish_rank(self, address: RankAddress) -> None:
        self._ranks[address.replica_id] = (address, time.monotonic())

    def forget(self, replica_id: str, gang_id: str | None = None) -> None:
        self._ranks.pop(replica_id, None)
        if gang_id is not None:
            self._addresses.pop(gang_id, None)

    def ranks(self) -> list[RankAddress]:
        now = time.monotonic()
        for rid in [r for r, (_, t) in self._ranks.items() if now - t > STALE_AFTER_S]:
            del self._ranks[rid]
        return [a for a, _ in self._ranks.values()]


def registry(app_name: str):
    """The application's registry actor, created by whoever asks first (also after it died)."""
    return GangRegistry.options(  # type: ignore[attr-defined]
        name=f"registry-{app_name}",
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy="DEFAULT",  # never inside the caller's gang placement group
    ).remote()


class RegistryClient:
    """The registry of one application for a caller that talks to it every REPORT_PERIOD_S:
    the handle is kept while calls succeed (no lookup per call) and found again by name once
    one failed (the registry died and is being re-created)."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._handle: Any = None
        self._pending: ray.ObjectRef | None = None  # the last fire-and-forget publish

    def _registry(self) -> Any:
        if self._pending is not None:  # a publish that failed means a dead handle
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self._pending = None
                try:
                    ray.get(ready[0], timeout=0)
                except Exception:
                    self._handle = None
        if self._handle is None:
            self._handle = registry(self.app_name)
        return self._handle

    def publish_rank(self, address: RankAddress) -> None:
        self._pending = self._registry().publish_rank.remote(address)

    async def ranks(self) -> list[RankAddress]:
        try:
            return await self._registry().ranks.remote()
        except Exception:
            self._handle = None
            raise


def drop_registry(app_name: str) -> None:
    with contextlib.suppress(ValueError):  # ValueError: never created
        ray.kill(ray.get_actor(f"registry-{app_name}", namespace=NAMESPACE))


def gang_init_method(app_name: str, gang_id: str, rank: int, timeout_s: float = 120.0) -> str:
    """torch.distributed init method for a gang: rank 0 picks a port on its node and publishes
    it; the other ranks wait for it, raising TimeoutError after `timeout_s`."""
    if rank == 0:
        host = ray.util.get_node_ip_address()
        address = f"tcp://{host}:{free_port(host)}"
        ray.get(registry(app_name).publish_address.remote(gang_id, address), timeout=timeout_s)
        return address
    deadline = time.monotonic() + timeout_s
    wait = 0.01
    while (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(ray.exceptions.RayActorError):  # registry restarting
            address = ray.get(registry(app_name).address.remote(gang_id), timeout=left)
            if address is not None:
                return address
        time.sleep(min(wait, left))  # polling another process's state, not synchronizing tests
        wait = min(wait * 2, 0.5)
    raise TimeoutError(f"rank 0 of gang {gang_id} did not publish its address in {timeout_s} s")
