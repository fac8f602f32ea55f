"""What the router and the stage ranks say to each other: plain, picklable, no tensors except
inside a KV handoff. The router builds jobs, ranks answer with chunks and status snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.engine.engine import RequestOutput
from workers.engine.params import SamplingParams

__all__ = ["Chunk", "DecodeJob", "PrefillJob", "PrefillResult", "RankStatus"]


@dataclass(frozen=True)
class PrefillJob:
    request_id: str
    prompt_token_ids: list[int]  # validated by the router
    params: SamplingParams  # validated by the router


@dataclass(frozen=True)
class DecodeJob:
    request_id: str
    num_prompt_tokens: int  # the decode balancer's estimate of the KV this job brings
    handoff: list[Any]  # [ObjectRef of a KVHandoff]: wrapped so Ray passes the reference on


@dataclass(frozen=True)
class Chunk:
    """The tokens one engine step added to one request (the rank-to-router stream unit)."""

    token_ids: list[int]
    text: str
    num_completion_tokens: int  # generated so far, this chunk included
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "handoff" on the last one
    logprobs: list[dict[int, float]] | None = None  # one per id in token_ids when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_output(cls, out: RequestOutput) -> Chunk:
        n = len(out.new_token_ids)
        lp = out.logprobs[len(out.logprobs) - n :] if out.logprobs is not None and n else None
        return cls(list(out.new_token_ids), out.new_text, len(out.token_ids), out.finish_reason, lp)


@dataclass(frozen=True)
class PrefillResult:
    first: Chunk  # the first token; finished unless it was "handoff"
    handoff: list[Any] = field(default_factory=list)  # [ObjectRef of a KVHandoff] to decode


@dataclass(frozen=True)
class RankStatus:
    """One rank's load, as the balancers, GetClusterStatus and the dashboard read it."""

    stage: str  # "prefill" | "decode"
    gang_id: str
    rank: int
    world_size: int
    replica_id: str
    running_requests: int
    queued_prompt_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    tokens_per_s: float
    tokens_processed: int  # prompt + generated tokens run since the rank started
    expert_load: list[list[int]]  # [MoE layer][logical expert] tokens over recent steps
    moe_layers: list[int]  # decoder layer index of each expert_load row
    time_s: float  # when the snapshot was taken (time.time() on the rank's node)
    dispatch_bytes_sent: int = 0  # MoE all-to-all bytes to other ranks since the rank started
    dispatch_bytes_received: int = 0  # ... and from them

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)
