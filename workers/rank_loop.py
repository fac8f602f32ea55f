"""One rank's engine driven by a background thread; request handlers talk to it via asyncio.

Why a thread: in an expert-parallel group every step is a collective, and Serve routes each
request to one replica, so a handler that stepped the engine itself would wait forever for its
peers. The loop thread is the only code that touches the engine and the collectives; handlers
put commands in an inbox and await per-request queues that the loop feeds with
`loop.call_soon_threadsafe`. With a `Lockstep` the loop steps with its group (empty steps when
only peers have work); when the whole group is idle it backs off (`IdleBackoff`) instead of
spinning, and a new request wakes it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from workers.engine import Engine, EngineStats, KVHandoff, RequestOutput, SamplingParams
from workers.engine.lockstep import IdleBackoff, Lockstep

__all__ = ["RankLoop"]


@dataclass(frozen=True)
class _Submit:
    request_id: str
    add: Callable[[], None]  # runs on the loop thread: engine.add_request / add_prefilled
    deliver: Callable[[object], None]  # thread-safe: hands an output or an exception over


class RankLoop:
    def __init__(
        self, engine: Engine, lockstep: Lockstep | None = None, backoff: IdleBackoff | None = None
    ) -> None:
        self.engine = engine
        self.lockstep = lockstep
        self.backoff = backoff or IdleBackoff()
        self._inbox: queue.SimpleQueue[_Submit | str] = queue.SimpleQueue()  # str: abort id
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._leave = threading.Event()
        self._deliver: dict[str, Callable[[object], None]] = {}
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="rank-loop", daemon=True)
        self.failed: BaseException | None = None  # set when the loop thread died

    def start(self) -> RankLoop:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0, graceful: bool = False) -> None:
        """Stop this loop; in a lockstep group, the whole group stops at the same step.
        `graceful` (a gang being scaled away): keep serving until every rank of the group has
        asked to leave, so a peer's in-flight requests finish; raises TimeoutError if that
        takes longer than `timeout_s`."""
        (self._leave if graceful and self.lockstep is not None else self._stop).set()
        self._wake.set()
        self.join(timeout_s)

    def join(self, timeout_s: float) -> None:
        """Wait until the loop has ended (e.g. a peer rank stopped the group)."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"rank loop did not stop within {timeout_s} s")

    def stats(self) -> EngineStats:
        """The engine's counters as of the last step (read without touching the engine)."""
        return self._stats

    async def generate(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] | None = None,
        prompt: str | None = None,
        request_id: str | None = None,
        prefill_only: bool = False,
        handoff: KVHandoff | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Bad input raises InvalidRequestError (before the first
        output); cancelling the consumer aborts the request and frees its KV blocks."""
        if self.failed is not None:
            raise RuntimeError(f"rank loop failed earlier: {self.failed!r}")
        rid = request_id or (handoff.request_id if handoff else f"req-{next(self._ids)}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[object] = asyncio.Queue()

        def deliver(item: object) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        def add() -> None:
            if handoff is not None:
                self.engine.add_prefilled(handoff)
            else:
                self.engine.add_request(
                    rid, params, prompt, prompt_token_ids, prefill_only=prefill_only
                )

        self._inbox.put(_Submit(rid, add, deliver))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, RequestOutput)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(rid)  # client went away: abort and free the KV
                self._wake.set()

    # --- the loop thread -------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, str):
                self.engine.abort(cmd)
                self._deliver.pop(cmd, None)
                continue
            try:
                cmd.add()
                self._deliver[cmd.request_id] = cmd.deliver
            except Exception as e:  # bad input or a full queue: tell the caller, keep going
                cmd.deliver(e)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the engine or a collective broke: fail every caller
            self.failed = e
            for deliver in self._deliver.values():
                deliver(RuntimeError(f"rank loop failed: {e!r}"))
            self._deliver.clear()
            raise

    def _loop(self) -> None:
        while True:
            self._drain()
            outputs: list[RequestOutput] | None
            if self.lockstep is not None:  # leave only when the whole group agrees to stop
                self.lockstep.stop_requested = self._stop.is_set()
                self.lockstep.leave_requested = self._leave.is_set()
                outputs = self.lockstep.step()
                if self.lockstep.stopped:
                    return
            elif self._stop.is_set():
                return
            else:
                outputs = self.engine.step() if self.engine.has_unfinished() else None
            self._stats = self.engine.stats()
            if outputs is None:
                self._wake.wait(self.backoff.current)  # a new request wakes the loop at once
                self._wake.clear()
                self.backoff.grow()
                continue
            self.backoff.busy()
            for out in outputs:
                deliver = self._deliver.get(out.request_id)
                if deliver is not None:
                    deliver(out)
                if out.finished:
                    self._deliver.pop(out.request_id, None)
