"""One request's life across the cluster, owned by the router: prefill rank -> first token ->
KV handoff -> decode rank -> tokens, with migration when the rank holding it is lost.

The router records what the client has received (token ids and how many characters of text).
When a rank hands a request back (MIGRATE: it died, its gang stopped, it drained past its
grace), the request is submitted again, to a healthy rank of the stage it needs, as a prefill of
prompt + tokens already streamed (`Resume`): the rank continues after them, so the client's
stream goes on with no duplicated and no missing tokens. Greedy output equals a fault-free run;
seeded sampling too (seeds are counter-based: token i draws from (seed, i) wherever it runs).
The KV of a handoff is released when the request ends before a decode rank pulled it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from router.channels import RankChannel, RankDirectory
from workers.engine import Resume, SamplingParams
from workers.messages import DRAINING, FULL, INVALID, MIGRATE, Delta, KVRef, Submit

__all__ = ["RequestFailed", "RequestState", "run_request"]


class RequestFailed(Exception):
    """The request cannot go on; `status` is the gRPC status name for the client, `field` the
    request field at fault when there is one (`sampling.top_p`; the HTTP API renames it)."""

    def __init__(self, status: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field

    def __reduce__(self):
        return type(self), (self.status, str(self), self.field)


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    delivered: list[int] = field(default_factory=list)  # token ids the client has
    delivered_chars: int = 0  # characters of text the client has
    max_migrations: int = 3
    migrations: int = 0
    kv: KVRef | None = None  # a handoff not yet pulled by a decode rank
    rank: RankChannel | None = None  # the rank holding the request now

    @property
    def stage(self) -> str:
        return "decode" if self.delivered else "prefill"


async def run_request(directory: RankDirectory, state: RequestState) -> AsyncGenerator[Delta]:
    """Yield the request's deltas (a "handoff" delta is the first token; the last delta is the
    finished one). Raises RequestFailed. Closing the iterator (client gone, deadline) aborts
    the request on its rank and releases an unpulled handoff."""
    try:
        while True:
            async for delta in _attempt(directory, state):
                yield delta
                if delta.finished and delta.finish_reason != "handoff":
                    return
            # the attempt ended without finishing: handed back, or a handoff to continue
    finally:
        if state.rank is not None:
            state.rank.abort(state.request_id)
            state.rank = None
        if state.kv is not None:
            directory.release(state.kv)
            state.kv = None


async def _attempt(directory: RankDirectory, state: RequestState) -> AsyncIterator[Delta]:
    """One submission to one rank, until it finishes, hands off or hands the request back."""
    decode = state.stage == "decode"
    rank, to_compute = await directory.pick(
        state.stage, state.prompt_token_ids, continuation=decode
    )
    queue: asyncio.Queue[Delta] = asyncio.Queue()
    msg = Submit(
        state.request_id,
        state.prompt_token_ids,
        state.params,
        prefill_only=not decode,
        resume=Resume(list(state.delivered), state.delivered_chars) if decode else None,
        kv=state.kv if decode else None,
    )
    num_tokens = len(state.prompt_token_ids) + len(state.delivered)
    state.rank = rank
    rank.submit(msg, queue, directory.kv_blocks(num_tokens), None if decode else to_compute)
    while True:
        d = await queue.get()
        if d.error_kind is None:
            if decode and state.kv is not None:
                state.kv = None  # the decode rank has it (pulled, or recomputed without it)
            state.delivered += d.token_ids
            state.delivered_chars += len(d.text)
            if d.finished:
                state.rank = None
                if d.finish_reason == "handoff":
                    state.kv = d.kv
            yield d
            if d.finished:
                return
            continue
        state.rank = None
        if d.error_kind == MIGRATE:
            state.migrations += 1
            _check_migrations(state, d)
            return
        if d.error_kind == DRAINING:
            return
        if d.error_kind == INVALID:
            raise RequestFailed("INVALID_ARGUMENT", d.error or "invalid request")
        if d.error_kind == FULL:
            raise RequestFailed(
                "RESOURCE_EXHAUSTED", f"the cluster is full ({d.error}); retry later"
            )
        raise RequestFailed("INTERNAL", f"request {state.request_id} failed on its rank: {d.error}")


def _check_migrations(state: RequestState, d: Delta) -> None:
    if state.migrations > state.max_migrations:
        raise RequestFailed(
            "UNAVAILABLE",
            f"request {state.request_id} lost its rank {state.migrations} times ({d.error}), "
            f"more than router.max_migrations ({state.max_migrations}) allows; retry",
        )
