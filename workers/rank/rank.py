"""`Rank`: one rank of a prefill or decode gang. It owns the engine, its gang membership and the
only loop that steps the engine, on a thread of its own.

Why a thread: every MoE layer is a collective over the gang, so the loop that steps must never
wait on a request handler; it is also the only code touching the engine and the process group.
Everything else talks to it through thread-safe calls that queue commands (`submit`, `abort`,
`end_session`, `drain`, `stop`), and reads what it publishes:
- after every step that changed something, `publish(by_session, load, admitted)` with one list
  of `Delta`s per router session (the channel server turns each into one `StepReport` frame);
- an immutable `snapshot` (load and, every STATUS_PERIOD_S, the full `RankStatus`).

Nothing a rank holds is lost silently: a request's failure ends that request only (the engine
isolates it); when the loop stops, drains past its grace or dies, every request it holds or has
queued is published as `MIGRATE`, so its router runs it elsewhere from the tokens streamed.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from workers.engine import Engine, InvalidRequestError, QueueFullError
from workers.engine.handoff import KVHandoff
from workers.engine.lockstep import IdleBackoff, Lockstep
from workers.messages import (
    DRAINING,
    FULL,
    INVALID,
    MAX_CACHED_PREFIXES,
    MIGRATE,
    Abort,
    Delta,
    KVRef,
    RankLoad,
    RankStatus,
    Submit,
)
from workers.rank.core_turn import CoreTurn
from workers.rank.trace import StepTrace

__all__ = ["GangMember", "Publish", "Rank", "RankSnapshot", "STATUS_PERIOD_S"]

STATUS_PERIOD_S = 0.5
Publish = Callable[[dict[str, list[Delta]], RankLoad, dict[str, int]], None]


@dataclass(frozen=True)
class GangMember:
    """Who a rank is: its gang (one expert-parallel process group) and its place in it."""

    stage: str  # "prefill" | "decode"
    gang_id: str
    rank: int
    world_size: int
    replica_id: str


@dataclass(frozen=True)
class RankSnapshot:
    """Published by the loop after each step; read from any thread without locks."""

    load: RankLoad
    status: RankStatus | None  # refreshed every STATUS_PERIOD_S


@dataclass(frozen=True)
class _Submit:
    session: str
    msg: Submit
    kv: Sequence[torch.Tensor] | None


@dataclass(frozen=True)
class _EndSession:
    session: str


class _Rate:
    """Tokens per second over a sliding window of (time, total tokens) samples."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def update(self, now: float, total: int) -> float:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0


@dataclass
class _Held:
    session: str
    submit: Submit


@dataclass
class _State:
    """Loop-thread state (never touched by other threads)."""

    held: dict[str, _Held] = field(default_factory=dict)  # request id -> its router session
    admitted: collections.Counter[str] = field(default_factory=collections.Counter)


class Rank:
    def __init__(
        self,
        engine: Engine,
        member: GangMember,
        *,
        lockstep: Lockstep | None = None,
        put_kv: Callable[[KVHandoff, str], KVRef] | None = None,
        end_session_kv: Callable[[str], object] | None = None,
        expert_load: Callable[[], list[list[int]]] = list,
        dispatch_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0),
        close_group: Callable[[], None] = lambda: None,
        backoff: IdleBackoff | None = None,
        turn: CoreTurn | None = None,
    ) -> None:
        self.engine = engine
        self.member = member
        self.publish: Publish = lambda by_session, load, admitted: None  # set by the channel
        self._lockstep = lockstep
        self._turn = turn  # taken for each step with work (a gang's: until its next agreement)
        if lockstep is not None and turn is not None:
            lockstep.turn = turn
        self._put_kv = put_kv
        self._end_session_kv = end_session_kv or (lambda session: None)
        self._expert_load = expert_load
        self._dispatch_bytes = dispatch_bytes
        self._close_group = close_group
        # idle, a gang member sleeps on its gang's doorbell (a peer rings when it gets work) or,
        # without one (no shared memory), polls its peers (up to 50 ms late); a rank alone has no
        # one to poll: it sleeps until a command wakes it. Both wake only to refresh the status
        # (on two cores every wake-up costs a busy neighbour's step).
        alone = lockstep is None or lockstep.alone
        self._bell = None if alone or lockstep is None else lockstep.doorbell
        self._backoff = backoff or (IdleBackoff(max_s=STATUS_PERIOD_S) if alone else IdleBackoff())
        self._inbox: queue.SimpleQueue[_Submit | Abort | _EndSession] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._leave = threading.Event()
        self._accepting = True
        self._drain_deadline: float | None = None
        self._state = _State()
        self._rate = _Rate()
        self._status_at = 0.0
        self._summary: tuple[int, frozenset[int]] = (-1, frozenset())  # (cache version, it)
        self._moe_layers = _moe_layer_indices(engine)
        self.failed: BaseException | None = None  # set when the loop died
        self.snapshot = RankSnapshot(self._load(), None)
        self._trace = StepTrace.from_env(member.stage, member.gang_id, member.rank)
        self._thread = threading.Thread(target=self._run, name="rank-loop", daemon=True)

    # --- any thread --------------------------------------------------------------------------
    def start(self) -> Rank:
        self._thread.start()
        return self

    def submit(self, session: str, msg: Submit, kv: Sequence[torch.Tensor] | None = None) -> None:
        self._put(_Submit(session, msg, kv))

    def abort(self, request_id: str) -> None:
        self._put(Abort(request_id))

    def end_session(self, session: str) -> None:
        """The router behind `session` is gone: abort its requests, drop its handoffs."""
        self._put(_EndSession(session))

    def drain(self, grace_s: float) -> None:
        """Stop admitting new requests (refused as DRAINING, so routers go elsewhere; the
        continuation of a request already running in the cluster, a handoff or a migration,
        is still taken); the requests held finish within `grace_s`, then the rest are handed
        back as MIGRATE."""
        self._accepting = False
        self._drain_deadline = time.monotonic() + grace_s
        self._notify()

    @property
    def num_held(self) -> int:
        return self.snapshot.load.running_requests

    def stop(self, timeout_s: float = 30.0, graceful: bool = False) -> None:
        """Stop the loop; in a gang the whole gang stops at the same step. `graceful` (the gang
        is being scaled away): keep stepping with the gang until every rank asked to leave.
        Every request still held is handed back as MIGRATE. Raises TimeoutError when the loop
        does not end within `timeout_s`."""
        (self._leave if graceful and self._lockstep is not None else self._stop).set()
        self._notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"rank loop did not stop within {timeout_s} s")
        self._close_group()
        if self._turn is not None:
            self._turn.close()

    def join(self, timeout_s: float) -> bool:
        """Wait for the loop to end (e.g. a peer stopped the gang); True if it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def check_health(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"{self.member.stage} rank loop failed: {self.failed!r}")
        if not self._thread.is_alive() and not (self._stop.is_set() or self._leave.is_set()):
            raise RuntimeError(f"{self.member.stage} rank loop stopped: its gang stopped")

    def _put(self, cmd: _Submit | Abort | _EndSession) -> None:
        self._inbox.put(cmd)
        self._notify()

    def _notify(self) -> None:
        """Wake the loop (and, in a gang with a doorbell, the whole sleeping gang)."""
        self._wake.set()
        if self._bell is not None:
            self._bell.ring()

    # --- the loop thread ---------------------------------------------------------------------
    def _run(self) -> None:
        out: dict[str, list[Delta]] = collections.defaultdict(list)
        try:
            self._loop(out)
        except BaseException as e:  # the engine or a collective broke
            self.failed = e
            raise
        finally:
            if self._lockstep is not None:  # a loop that ends between steps may hold the turn
                self._lockstep.let_go()
            self._accepting = False
            self._hand_back(out, "its rank stopped")
            self._commands(out)  # whatever arrived meanwhile is handed back too
            self._hand_back(out, "its rank stopped")
            self._flush(out, force=True)

    def _loop(self, out: dict[str, list[Delta]]) -> None:
        while True:
            bell = 0 if self._bell is None else self._bell.count()  # before the commands it covers
            self._commands(out)
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                self._hand_back(out, "its rank was drained")
            outputs: list | None
            started = time.time()
            if self._lockstep is not None:  # leave only when the whole gang agrees
                self._lockstep.stop_requested = self._stop.is_set()
                self._lockstep.leave_requested = self._leave.is_set()
                outputs = self._lockstep.step(bell)
                if self._lockstep.stopped:
                    return
            elif self._stop.is_set() or self._leave.is_set():
                return
            elif self.engine.has_unfinished():
                with self._turn or contextlib.nullcontext():
                    outputs = self.engine.step()
            else:
                outputs = None
            if self._trace is not None and outputs is not None:
                self._trace.record(started, time.time(), self.engine)
            for o in outputs or ():
                held = self._state.held.get(o.request_id)
                if held is None:
                    continue
                kv = None
                if o.handoff is not None and self._put_kv is not None:
                    kv = self._put_kv(o.handoff, held.session)
                out[held.session].append(Delta.from_output(o, kv))
                if o.finished:
                    del self._state.held[o.request_id]
            self._flush(out, force=outputs is not None)
            if outputs is None:
                self._idle()
            else:
                self._backoff.busy()

    def _idle(self) -> None:
        """Wait for work after a step without any (in a gang: the whole gang had none)."""
        lockstep = self._lockstep
        if self._bell is not None and lockstep is not None and not lockstep.stopped:
            while not lockstep.sleep_idle(STATUS_PERIOD_S):  # until a rank of the gang rings
                self._publish_snapshot()
            return
        self._wake.wait(self._backoff.current)  # a new request wakes the loop at once
        self._wake.clear()
        self._backoff.grow()

    def _commands(self, out: dict[str, list[Delta]]) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, Abort):
                self.engine.abort(cmd.request_id)
                self._state.held.pop(cmd.request_id, None)
            elif isinstance(cmd, _EndSession):
                for rid in [r for r, h in self._state.held.items() if h.session == cmd.session]:
                    self.engine.abort(rid)
                    del self._state.held[rid]
                self._state.admitted.pop(cmd.session, None)
                out.pop(cmd.session, None)
                self._end_session_kv(cmd.session)
            else:
                self._admit(cmd, out)

    def _admit(self, cmd: _Submit, out: dict[str, list[Delta]]) -> None:
        m = cmd.msg
        self._state.admitted[cmd.session] += 1
        if not self._accepting and m.resume is None:  # continuations of admitted work go on
            out[cmd.session].append(Delta.ended(m.request_id, DRAINING, "the rank is draining"))
            return
        try:
            self.engine.add_request(
                m.request_id,
                m.params,
                prompt_token_ids=m.prompt_token_ids,
                prefill_only=m.prefill_only,
                resume=m.resume,
                kv=cmd.kv,
            )
        except InvalidRequestError as e:
            out[cmd.session].append(Delta.ended(m.request_id, INVALID, str(e)))
        except QueueFullError as e:
            out[cmd.session].append(Delta.ended(m.request_id, FULL, str(e)))
        else:
            self._state.held[m.request_id] = _Held(cmd.session, m)

    def _hand_back(self, out: dict[str, list[Delta]], why: str) -> None:
        """Every request held leaves this rank intact (MIGRATE); its KV is freed here."""
        for rid, held in self._state.held.items():
            self.engine.abort(rid)
            out[held.session].append(Delta.ended(rid, MIGRATE, why))
        self._state.held.clear()

    def _flush(self, out: dict[str, list[Delta]], force: bool) -> None:
        self._publish_snapshot()
        if out or force:
            self.publish(dict(out), self.snapshot.load, dict(self._state.admitted))
            out.clear()

    def _publish_snapshot(self) -> None:
        now = time.time()
        status = self.snapshot.status
        if now - self._status_at >= STATUS_PERIOD_S:
            self._status_at = now
            status = self._status(now)
        self.snapshot = RankSnapshot(self._load(), status)

    def _load(self) -> RankLoad:
        s = self.engine.stats()
        return RankLoad(
            key=self.member.replica_id,
            queued_prompt_tokens=s.num_queued_prompt_tokens,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total,
            running_requests=s.num_requests,
            accepting=self._accepting,
            cached_prefixes=self._cached_prefixes(),
        )

    def _cached_prefixes(self) -> frozenset[int]:
        """The prefix-cache summary for routers, rebuilt only when the cache changed."""
        blocks = self.engine.blocks
        if self._summary[0] != blocks.version:
            self._summary = (blocks.version, blocks.summary(MAX_CACHED_PREFIXES))
        return self._summary[1]

    def _status(self, now: float) -> RankStatus:
        s, m = self.engine.stats(), self.member
        sent, received = self._dispatch_bytes()
        return RankStatus(
            stage=m.stage,
            gang_id=m.gang_id,
            rank=m.rank,
            world_size=m.world_size,
            replica_id=m.replica_id,
            running_requests=s.num_requests,
            queued_prompt_tokens=s.num_queued_prompt_tokens,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total,
            tokens_per_s=self._rate.update(now, s.num_tokens_processed),
            tokens_processed=s.num_tokens_processed,
            expert_load=self._expert_load(),
            moe_layers=self._moe_layers,
            time_s=now,
            dispatch_bytes_sent=sent,
            dispatch_bytes_received=received,
            accepting=self._accepting,
            kv_blocks_cached=s.kv_blocks_cached,
            prefix_query_tokens=s.prefix_query_tokens,
            prefix_hit_tokens=s.prefix_hit_tokens,
        )


def _moe_layer_indices(engine: Engine) -> list[int]:
    """Decoder layer index of each MoE layer, from module names like "layers.3.mlp.experts"."""
    moe = {id(m) for m in engine.model.moe_layers()}
    return [
        int(name.split("layers.")[1].split(".")[0])
        for name, module in engine.model.named_modules()
        if id(module) in moe
    ]
