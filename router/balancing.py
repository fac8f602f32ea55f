"""Per-stage balancing of ranks (DeepSeek's serving balancers), as pure functions plus the Ray
Serve request routers that apply them.

- prefill: fewest queued prompt tokens; ties go to the rank that last took the same prompt
  prefix (prefix affinity), then to the lower replica id.
- decode: lowest KV usage, then fewest running requests, then the lower replica id.

Each rank reports its load through Serve's `record_routing_stats` (every
`request_routing_stats_period_s`, stamped with the rank's `time_s`). To a rank's last report this
router adds what it sent there and has not seen finish, unless it was routed more than
ADMISSION_GRACE_S before that report (then the report shows it), so a burst of requests does not
all land on the rank that looked idle at the last report. Recent requests may count twice
(report + own) for up to the grace: a conservative bias. The estimate charges the
rank this router picked first; if Serve had to fall back to another (the first was full), the
next report corrects it.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

__all__ = [
    "DecodeRequestRouter",
    "PrefillRequestRouter",
    "RankLoad",
    "prefix_key",
    "rank_decode",
    "rank_prefill",
]

PREFIX_TOKENS = 32  # prompt tokens that make the affinity key
_AFFINITY_ENTRIES = 4096
_FORGET_AFTER_S = 600.0
# A request reaches a rank's engine some time after it is routed (transit, the KV pull, the
# rank finishing its current step), so a report taken shortly after routing may not show it
# yet: own requests count until a report taken this long after their routing.
ADMISSION_GRACE_S = 2.0  # an in-flight entry older than this is dropped


@dataclass(frozen=True)
class RankLoad:
    """The balancers' view of one rank: its last report plus this router's own in-flight work."""

    key: str  # the replica id
    queued_prompt_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 1
    running_requests: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)


def rank_prefill(loads: list[RankLoad], affinity: str | None = None) -> list[str]:
    """Replica ids best first: fewest queued prompt tokens; ties: `affinity` first, then id."""
    return [
        r.key
        for r in sorted(loads, key=lambda r: (r.queued_prompt_tokens, r.key != affinity, r.key))
    ]


def rank_decode(loads: list[RankLoad]) -> list[str]:
    """Replica ids best first: lowest KV usage, then fewest running requests, then id."""
    return [r.key for r in sorted(loads, key=lambda r: (r.kv_usage, r.running_requests, r.key))]


def prefix_key(prompt_token_ids: list[int]) -> tuple[int, ...]:
    return tuple(prompt_token_ids[:PREFIX_TOKENS])


class _StageRouter(RequestRouter):
    """Ranks candidates with a stage policy; Serve sends to the first rank that has room."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.block_size = int(kwargs.get("block_size", 16))
        # internal request id -> (replica id, what it adds to that replica's load, when routed)
        self._inflight: dict[str, tuple[str, int, float]] = {}

    def _own(self, candidates: list[RunningReplica]) -> tuple[dict[str, int], dict[str, int]]:
        """Per replica: summed weight and count of this router's in-flight requests that its
        last report may not show yet (routed less than ADMISSION_GRACE_S before it)."""
        reported_at = {
            r.replica_id.unique_id: float((r.routing_stats or {}).get("time_s", 0.0))
            for r in candidates
        }
        weight: dict[str, int] = collections.defaultdict(int)
        count: dict[str, int] = collections.defaultdict(int)
        now = time.time()
        for rid, (replica, w, routed_at) in list(self._inflight.items()):
            if now - routed_at > _FORGET_AFTER_S:  # cancelled before Serve sent it: never completes
                del self._inflight[rid]
            elif routed_at > reported_at.get(replica, 0.0) - ADMISSION_GRACE_S:
                weight[replica] += w
                count[replica] += 1
        return weight, count

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self._inflight.pop(internal_request_id, None)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        job = pending_request.args[0] if pending_request and pending_request.args else None
        weight, count = self._own(candidate_replicas)
        loads = [
            self._load(r.replica_id.unique_id, r.routing_stats or {}, weight, count)
            for r in candidate_replicas
        ]
        order = self._order(loads, job)
        if job is not None and pending_request is not None and order:
            rid = pending_request.metadata.internal_request_id
            self._inflight[rid] = (order[0], self._weight(job), time.time())
            self._routed(job, order[0])
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[key]] for key in order]

    # --- the stage's policy ----------------------------------------------------------------
    def _load(
        self, key: str, stats: dict[str, Any], weight: dict[str, int], count: dict[str, int]
    ) -> RankLoad:
        """One replica's load: its last report plus this router's `weight`/`count` there."""
        raise NotImplementedError

    def _order(self, loads: list[RankLoad], job: Any) -> list[str]:
        raise NotImplementedError

    def _weight(self, job: Any) -> int:
        """What `job` adds to its replica's load until it completes."""
        raise NotImplementedError

    def _routed(self, job: Any, replica: str) -> None:
        """Called once `job` is charged to `replica`."""


class PrefillRequestRouter(_StageRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self._affinity: collections.OrderedDict[tuple[int, ...], str] = collections.OrderedDict()

    def _load(self, key, stats, weight, count) -> RankLoad:
        queued = int(stats.get("queued_prompt_tokens", 0)) + weight[key]
        return RankLoad(key, queued_prompt_tokens=queued)

    def _order(self, loads: list[RankLoad], job: Any) -> list[str]:
        prefix = prefix_key(job.prompt_token_ids) if job is not None else ()
        return rank_prefill(loads, self._affinity.get(prefix))

    def _weight(self, job: Any) -> int:
        return len(job.prompt_token_ids)

    def _routed(self, job: Any, replica: str) -> None:
        prefix = prefix_key(job.prompt_token_ids)
        self._affinity[prefix] = replica
        self._affinity.move_to_end(prefix)
        if len(self._affinity) > _AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)


class DecodeRequestRouter(_StageRouter):
    def _load(self, key, stats, weight, count) -> RankLoad:
        return RankLoad(
            key,
            kv_blocks_used=int(stats.get("kv_blocks_used", 0)) + weight[key],
            kv_blocks_total=int(stats.get("kv_blocks_total", 1)),
            running_requests=int(stats.get("running_requests", 0)) + count[key],
        )

    def _order(self, loads: list[RankLoad], job: Any) -> list[str]:
        return rank_decode(loads)

    def _weight(self, job: Any) -> int:
        return math.ceil((job.num_prompt_tokens + 1) / self.block_size)
