"""What routers and ranks say to each other over a rank channel (`workers/wire` frames them):
plain dataclasses of plain fields, so each has one msgpack schema (`workers/wire/codec.py`); the
only tensors are a KV handoff's, as raw bytes with dtype and shape (`WireTensor`).

One channel is one TCP connection between one router replica and one rank (and, for a KV
pull, between a decode rank and the prefill rank that owns the KV). Router -> rank: `Hello`
first, then `Submit`, `Abort`, `Release`, `DrainRank`. Rank -> router: one `StepReport` per
engine step carrying every new token of every request this router has on the rank, and a
`StepReport` with no deltas as a heartbeat (with the rank's full `RankStatus` every
`STATUS_PERIOD_S`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.engine import RequestOutput, Resume
from workers.engine.params import SamplingParams

__all__ = [
    "Abort",
    "Delta",
    "DrainRank",
    "Fetch",
    "Hello",
    "KVData",
    "KVPayload",
    "KVRef",
    "RankAddress",
    "RankLoad",
    "RankStatus",
    "Release",
    "StepReport",
    "Submit",
    "WireTensor",
]

PROTOCOL = 3  # bumped when a message changes shape; Hello carries it
MAX_CACHED_PREFIXES = 256  # entries of RankLoad.cached_prefixes: bounds every load report

# Delta.error_kind values: what the router does with a request that ended without finishing
INVALID = "invalid"  # bad input the rank caught: INVALID_ARGUMENT to the client
FULL = "full"  # the rank's queue is full: another rank, or RESOURCE_EXHAUSTED
FAILED = "failed"  # this request failed on the rank (sampling, stop, detokenize): INTERNAL
MIGRATE = "migrate"  # the rank is stopping or failed; the request is intact: run it elsewhere
DRAINING = "draining"  # the rank admits nothing new: submit elsewhere (not a migration)


@dataclass(frozen=True)
class RankAddress:
    """Where a rank listens for channels; published in the registry once the rank serves."""

    replica_id: str  # Serve replica id: unique per incarnation
    stage: str  # "prefill" | "decode"
    gang_id: str
    rank: int
    world_size: int
    host: str
    port: int
    block_size: int = 16  # tokens per KV block: routers hash prompts in the same blocks
    cache_salt: bytes = b""  # root of the rank's block-hash chains; empty: no prefix cache


@dataclass(frozen=True)
class Hello:
    """The first frame of a connection: who connects and which protocol it speaks."""

    peer_id: str  # the router replica (or "kv:<replica>" for a KV pull)
    protocol: int = PROTOCOL


@dataclass(frozen=True)
class KVRef:
    """A prefilled prompt's KV, held by the prefill rank that computed it until a decode rank
    pulls it (`Fetch`) or the router releases it. Small: travels through the router."""

    owner_host: str
    owner_port: int
    key: str
    num_bytes: int


@dataclass(frozen=True)
class Submit:
    request_id: str
    prompt_token_ids: list[int]  # validated by the router
    params: SamplingParams  # validated by the router
    prefill_only: bool = False  # prefill stage: stop after the first token, hand off the KV
    resume: Resume | None = None  # output already streamed (handoff or migration)
    kv: KVRef | None = None  # the prompt's KV on a prefill rank (decode after a handoff)


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Release:
    """Router -> the KV's owner: nobody will pull this KV (request cancelled or failed)."""

    key: str


@dataclass(frozen=True)
class DrainRank:
    """Router -> rank: admit nothing new; what is held finishes within `grace_s`, then goes
    back to its router as MIGRATE."""

    grace_s: float


@dataclass(frozen=True)
class Fetch:
    """Decode rank -> the KV's owner: send the KV and forget it (imported exactly once)."""

    key: str


@dataclass(frozen=True)
class WireTensor:
    """A tensor on the wire: its bytes (row-major, the sender's little-endian layout) with the
    dtype and shape to read them by; the receiver checks both against its model's."""

    dtype: str  # torch dtype name without "torch.": "float32", "bfloat16", "float16"
    shape: list[int]
    data: bytes


@dataclass(frozen=True)
class KVPayload:
    """A `KVHandoff` on the wire (`workers/wire/kv.py` converts and checks)."""

    request_id: str
    prompt_token_ids: list[int]  # P tokens
    first_token: int
    num_emitted_chars: int
    params: SamplingParams
    kv: list[WireTensor]  # per layer [P, *kv_token_shape]
    logprobs: list[dict[int, float]] | None


@dataclass(frozen=True)
class KVData:
    key: str
    handoff: KVPayload | None  # None when the owner no longer has the key


@dataclass(frozen=True)
class Delta:
    """What one engine step added to one request."""

    request_id: str
    token_ids: list[int]
    text: str
    num_completion_tokens: int  # generated so far, this delta included
    # "stop" | "length" | "handoff" | "error" on the last one; None while running
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None  # one per id in token_ids when asked for
    kv: KVRef | None = None  # finish_reason "handoff": the prompt's KV for a decode rank
    # finish_reason "error": INVALID | FULL | FAILED | MIGRATE | DRAINING
    error_kind: str | None = None
    error: str | None = None  # one sentence for the client

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_output(cls, out: RequestOutput, kv: KVRef | None = None) -> Delta:
        n = len(out.new_token_ids)
        lp = out.logprobs[len(out.logprobs) - n :] if out.logprobs is not None and n else None
        kind = FAILED if out.finish_reason == "error" else None
        return cls(
            out.request_id,
            list(out.new_token_ids),
            out.new_text,
            len(out.token_ids),
            out.finish_reason,
            lp,
            kv,
            kind,
            out.error,
        )

    @classmethod
    def ended(cls, request_id: str, kind: str, error: str) -> Delta:
        return cls(request_id, [], "", 0, "error", error_kind=kind, error=error)


@dataclass(frozen=True)
class RankLoad:
    """The balancers' view of one rank (also the routers' own estimate on top of it)."""

    key: str  # the replica id
    queued_prompt_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 1
    running_requests: int = 0
    accepting: bool = True  # False while draining: no new requests
    # short hashes of prompt blocks the rank's prefix cache holds, at the chain depths of
    # `block_hash.is_summary_depth`, most recently used first, at most MAX_CACHED_PREFIXES
    cached_prefixes: frozenset[int] = frozenset()

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)


@dataclass(frozen=True)
class RankStatus:
    """One rank's full snapshot, as GetClusterStatus and the metrics read it."""

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
    accepting: bool = True  # False while draining
    kv_blocks_cached: int = 0  # blocks in the prefix cache (in use or free to evict)
    prefix_query_tokens: int = 0  # tokens looked up in the prefix cache since start
    prefix_hit_tokens: int = 0  # of those, found cached: prefill not computed again

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / max(1, self.prefix_query_tokens)


@dataclass(frozen=True)
class StepReport:
    """Rank -> one router: the deltas of its requests from one step (possibly none: a
    heartbeat), the rank's load after that step, and how many of this router's Submits the rank
    has taken into its engine (`num_admitted`), so the router counts the rest as its own
    pending load."""

    load: RankLoad
    num_admitted: int
    deltas: list[Delta] = field(default_factory=list)
    status: RankStatus | None = None  # the full snapshot, every STATUS_PERIOD_S
