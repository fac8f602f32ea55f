"""The router's end of the rank channels: one `RankChannel` (TCP connection) per rank, and the
`RankDirectory` that keeps them in step with the ranks the registry lists.

A channel knows, at every moment, which requests it holds and the rank's load: the rank's last
report plus what this router submitted that the rank has not taken in yet (`num_admitted`). When
the connection breaks, or the rank stays silent past `rank_timeout_s` (it heartbeats every
0.25 s), every request it held receives a MIGRATE delta: the request driver
(`router/lifecycle.py`) runs it elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable

from router.balancing import cached_tokens, rank_decode, rank_prefill
from workers.engine.block_hash import prompt_marks
from workers.messages import (
    MIGRATE,
    Abort,
    Delta,
    DrainRank,
    Hello,
    KVRef,
    RankAddress,
    RankLoad,
    RankStatus,
    Release,
    StepReport,
    Submit,
)
from workers.wire import ChannelClosed, WireError, WireKey, WireStream, connect

__all__ = ["RankChannel", "RankDirectory"]

log = logging.getLogger("moe_cluster.router")

ROUTED_MARKS = 4096  # prompt-block marks a channel remembers sending (its rank will cache them)


class RankChannel:
    def __init__(
        self, address: RankAddress, peer_id: str, rank_timeout_s: float, key: WireKey
    ) -> None:
        self.address = address
        self.peer_id = peer_id
        self._key = key
        self.rank_timeout_s = rank_timeout_s
        self.reported = RankLoad(address.replica_id)
        self.status: RankStatus | None = None
        self.alive = False
        self.requests: dict[str, asyncio.Queue[Delta]] = {}
        # own submits the rank has not taken in yet: (submit number, prompt tokens, KV blocks)
        self._unadmitted: collections.deque[tuple[int, int, int]] = collections.deque()
        self._num_submitted = 0
        # summary marks of prompts this router sent the rank (most recent last): their blocks
        # are cached there once computed, before the rank's reports can say so
        self._routed: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._stream: WireStream | None = None
        self._reader_task: asyncio.Task | None = None
        self.on_lost: Callable[[RankChannel], None] = lambda ch: None

    @property
    def key(self) -> str:
        return self.address.replica_id

    async def connect(self, timeout_s: float = 5.0) -> None:
        """Dial the rank and authenticate both ends (`workers/wire`). Raises OSError,
        TimeoutError, or WireError when the rank cannot prove it holds the cluster's key."""
        a = self.address
        stream = await connect(a.host, a.port, self._key, timeout_s=timeout_s)
        stream.send(Hello(self.peer_id))
        self._stream = stream
        self.alive = True
        self._reader_task = asyncio.create_task(self._read(stream), name=f"channel-{self.key}")

    def load(self) -> RankLoad:
        """The rank's last report plus this router's submits it has not taken in yet."""
        r = self.reported
        return RankLoad(
            r.key,
            queued_prompt_tokens=r.queued_prompt_tokens + sum(t for _, t, _ in self._unadmitted),
            kv_blocks_used=r.kv_blocks_used + sum(b for _, _, b in self._unadmitted),
            kv_blocks_total=r.kv_blocks_total,
            running_requests=r.running_requests + len(self._unadmitted),
            accepting=r.accepting,
        )

    def cached_tokens(self, marks: list[tuple[int, int]]) -> int:
        """Tokens of a prompt (its `prompt_marks`) the rank holds or will hold."""
        return cached_tokens(marks, self.reported.cached_prefixes, self._routed)

    def expect(self, marks: list[tuple[int, int]]) -> None:
        """Remember that a prompt with these marks goes to this rank."""
        for _, h in marks:
            self._routed[h] = None
            self._routed.move_to_end(h)
        while len(self._routed) > ROUTED_MARKS:
            self._routed.popitem(last=False)

    def submit(
        self,
        msg: Submit,
        queue: asyncio.Queue[Delta],
        kv_blocks: int,
        prompt_tokens: int | None = None,
    ) -> None:
        """Send `msg`; until the rank takes it in, count `kv_blocks` and `prompt_tokens` (the
        prompt tokens it will compute; default: all, or none when `msg` brings its KV) as load."""
        if not self.alive or self._stream is None:
            queue.put_nowait(Delta.ended(msg.request_id, MIGRATE, "its rank was lost"))
            return
        self.requests[msg.request_id] = queue
        self._num_submitted += 1
        if prompt_tokens is None:
            prompt_tokens = 0 if msg.kv is not None else len(msg.prompt_token_ids)
        self._unadmitted.append((self._num_submitted, prompt_tokens, kv_blocks))
        self._stream.send(msg)

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None and self.alive and self._stream:
            self._stream.send(Abort(request_id))

    def release(self, key: str) -> None:
        if self.alive and self._stream is not None:
            self._stream.send(Release(key))

    def drain(self, grace_s: float) -> None:
        if self.alive and self._stream is not None:
            self._stream.send(DrainRank(grace_s))
            # stop routing here at once, before the rank's next report says so
            self.reported = dataclasses.replace(self.reported, accepting=False)

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._stream is not None:
            self._stream.close()
        self._lost("the router closed the channel")

    async def _read(self, stream: WireStream) -> None:
        why = "its rank was lost"
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(stream.recv(), self.rank_timeout_s)
                except TimeoutError:
                    why = f"its rank was silent for {self.rank_timeout_s:g} s"
                    return
                if isinstance(msg, StepReport):
                    self._report(msg)
        except WireError as e:
            log.warning("closed the channel to %s rank %s: %s", self.address.stage, self.key, e)
        except ChannelClosed:
            pass
        finally:
            stream.close()
            self._lost(why)

    def _report(self, report: StepReport) -> None:
        self.reported = report.load
        if report.status is not None:
            self.status = report.status
        while self._unadmitted and self._unadmitted[0][0] <= report.num_admitted:
            self._unadmitted.popleft()
        for d in report.deltas:
            queue = self.requests.get(d.request_id)
            if queue is None:
                continue  # aborted by the router meanwhile
            queue.put_nowait(d)
            if d.finished:
                del self.requests[d.request_id]

    def _lost(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        for rid, queue in self.requests.items():
            queue.put_nowait(Delta.ended(rid, MIGRATE, why))
        self.requests.clear()
        self._unadmitted.clear()
        self.on_lost(self)


class RankDirectory:
    """Every rank this router can reach, by stage, kept current from the registry's list."""

    def __init__(
        self,
        list_ranks: Callable[[], Awaitable[list[RankAddress]]],
        peer_id: str,
        key: WireKey,
        *,
        block_size: int = 16,
        rank_timeout_s: float = 10.0,
        refresh_s: float = 0.5,
        cache_aware: bool = True,
    ) -> None:
        self._list_ranks = list_ranks
        self.peer_id = peer_id
        self._key = key
        self.block_size = block_size
        self.rank_timeout_s = rank_timeout_s
        self.refresh_s = refresh_s
        self.cache_aware = cache_aware  # False: prefill by queued tokens alone
        self.channels: dict[str, RankChannel] = {}
        self._lost: set[str] = set()  # replica ids whose channel broke: never reconnected
        self._refused: set[str] = set()  # replica ids that failed authentication (logged once)
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> RankDirectory:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="rank-directory")
        return self

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for ch in list(self.channels.values()):
            ch.close()
        self.channels.clear()

    async def refresh(self) -> None:
        """Connect to ranks that appeared. A channel outlives its rank's registry entry: the
        channel, not the list, says whether a rank is there (it breaks when the rank dies, goes
        silent for rank_timeout_s when it freezes, and a draining rank's streams finish on it
        before the rank closes it). An entry can lapse while its rank serves: a late report, a
        registry that lost its soft state while the ranks re-publish one by one; closing on
        that would migrate every stream on the channel and, a lost replica never being
        reconnected, leave a live rank unused by this router for good."""
        listed = {a.replica_id: a for a in await self._list_ranks()}
        for key, address in listed.items():
            if key in self.channels or key in self._lost:
                continue
            ch = RankChannel(address, self.peer_id, self.rank_timeout_s, self._key)
            ch.on_lost = self._on_lost
            try:
                await ch.connect()
            except WireError as e:  # not this cluster's key: said once, retried quietly
                if key not in self._refused:
                    self._refused.add(key)
                    log.warning("cannot authenticate with %s rank %s: %s", address.stage, key, e)
                continue
            except (OSError, TimeoutError) as e:
                log.warning("cannot reach %s rank %s: %r", address.stage, key, e)
                continue
            self.channels[key] = ch
            self._changed.set()

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # GCS restarting: keep the channels we have
                log.warning("rank list unavailable: %r", e)
            await asyncio.sleep(self.refresh_s)

    def _on_lost(self, ch: RankChannel) -> None:
        self._lost.add(ch.key)
        self.channels.pop(ch.key, None)
        self._changed.set()

    def healthy(self, stage: str) -> list[RankChannel]:
        return [
            ch
            for ch in self.channels.values()
            if ch.alive and ch.address.stage == stage and ch.reported.accepting
        ]

    async def pick(
        self, stage: str, prompt_token_ids: list[int], continuation: bool = False
    ) -> tuple[RankChannel, int]:
        """The best healthy rank of `stage` by its policy, and the prompt tokens it is expected
        to compute (its prefix cache taken off); waits while there is none (the caller bounds
        the wait with its deadline). A `continuation` (a request already running in the
        cluster: handoff or migration) may go to a draining rank when no other is left, so a
        drained cluster still finishes what it admitted."""
        while True:
            candidates = self.healthy(stage)
            if not candidates and continuation:
                candidates = [
                    ch for ch in self.channels.values() if ch.alive and ch.address.stage == stage
                ]
            if candidates:
                return self._choose(stage, candidates, prompt_token_ids)
            self._changed.clear()
            await self._changed.wait()

    def _choose(
        self, stage: str, candidates: list[RankChannel], prompt: list[int]
    ) -> tuple[RankChannel, int]:
        by_key = {ch.key: ch for ch in candidates}
        loads = [ch.load() for ch in candidates]
        if stage == "decode":
            return by_key[rank_decode(loads)[0]], len(prompt)
        marks: dict[tuple[int, bytes], list[tuple[int, int]]] = {}  # one model: one entry
        cached = {}
        for ch in candidates:
            a = ch.address
            if a.cache_salt and self.cache_aware:
                key = (a.block_size, a.cache_salt)
                if key not in marks:
                    marks[key] = prompt_marks(prompt, a.block_size, a.cache_salt)
                cached[ch.key] = ch.cached_tokens(marks[key])
        best = by_key[rank_prefill(loads, len(prompt), cached)[0]]
        if best.key in cached:
            best.expect(marks[(best.address.block_size, best.address.cache_salt)])
        return best, len(prompt) - cached.get(best.key, 0)

    def kv_blocks(self, num_tokens: int) -> int:
        return math.ceil((num_tokens + 1) / self.block_size)

    def release(self, ref: KVRef) -> None:
        """Tell the KV's owner nobody will pull it (no-op when the owner is gone)."""
        for ch in self.channels.values():
            if (ch.address.host, ch.address.port) == (ref.owner_host, ref.owner_port):
                ch.release(ref.key)
                return

    def statuses(self) -> list[RankStatus]:
        """The latest full status of every connected rank."""
        return [ch.status for ch in self.channels.values() if ch.alive and ch.status is not None]
