"""Lockstep stepping for the ranks of one expert-parallel group.

Every MoE layer is a collective, so all ranks of a group must run each step together. Before each
step the ranks agree on whether any of them has work (one tiny all-reduce); if so every rank
steps, a rank without work running an empty step (zero tokens dispatched). When the whole group
is idle, `Lockstep.step` returns None and the caller backs off (`IdleBackoff`) instead of
spinning: the dev and CI machines have 2 cores. Stopping is agreed the same way, in the same
all-reduce, so no rank leaves while a peer waits in a collective: one rank's `stop_requested`
stops the whole group at once (shutdown, failure); `leave_requested` (a graceful scale-down of
the gang) keeps a rank stepping, serving its own requests and its peers' collectives, until
every rank of the group has asked to leave.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from workers.engine.engine import Engine, RequestOutput
from workers.moe.shm_exchange import ShmExchange

__all__ = ["IdleBackoff", "Lockstep", "max_over_ranks", "max_over_ranks_shm"]


def max_over_ranks_shm(values: list[int], exchange: ShmExchange) -> list[int]:
    """`max_over_ranks` through a shared-memory exchange (the ranks of one host): each rank's
    values to every other, maxed locally. Collective over the exchange's group."""
    mine = torch.tensor(values, dtype=torch.int64)
    got = exchange.exchange([[mine]] * exchange.world)
    out = list(values)
    for msg in got:
        if msg is not None:
            theirs = msg.view(torch.int64).tolist()
            out = [max(a, b) for a, b in zip(out, theirs, strict=True)]
    return out


def max_over_ranks(values: list[int], group=None, device: torch.device | str = "cpu") -> list[int]:
    """Collective: element-wise max of `values` over the ranks of `group` (one tiny all-reduce;
    an OR for 0/1 flags). `device`: where they live, a CUDA device for NCCL (it reduces only
    device tensors)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


class Lockstep:
    """Steps one engine together with the other ranks of `group`.

    `after_step(num_steps)`, when set, runs after every group step on every rank, with the same
    count everywhere: a step boundary where a collective outside the forward (an expert
    rebalance) is safe. Every rank must set the same hook, or none.

    `turn`, when set, is taken before each step that has work (a `CoreTurn`: the gangs sharing
    a node's cores take turns); one rank of the group holding it holds the others at the step's
    first collective. It is let go at the next agreement, which every rank reaches only once its
    own part of the step is done: a peer that finishes later than the holder (more sequences,
    a later last exchange) does not share the cores with the next gang's step.

    `exchange`, when given (the expert-parallel dispatcher's shared-memory exchange over the
    same group), carries the agreement before a step that follows a step with work, where the
    ranks arrive together and a gloo all-reduce's round trip (~0.3-1 ms between busy ranks) is
    most of its cost. After an idle agreement the next one stays on the process group (chosen
    when the exchange's waits still polled; they now sleep on a futex too, so it could move to
    the exchange). Every rank knows the previous agreement, so all take the same path.

    The exchange's doorbell lets an idle group sleep instead of polling. A rank rings after it
    queues work (and for a stop or a leave); each agreement also settles `rung`, the lowest
    doorbell count its ranks read before they took in their queued work, so a ring whose work
    some rank had not taken in yet is past `rung`. After an idle agreement every rank calls
    `sleep_idle`, which returns True once the count differs from `rung` (every rank then
    agrees again) and False on its timeout (no agreement: a rank may refresh its status and
    sleep again)."""

    def __init__(
        self,
        engine: Engine,
        group=None,
        after_step: Callable[[int], object] | None = None,
        exchange: ShmExchange | None = None,
    ) -> None:
        self.engine = engine
        self.group = group
        self.exchange = exchange
        self.doorbell = exchange.doorbell if exchange is not None else None
        self.rung = 0  # the doorbell count settled by the last agreement
        self.num_agreements = 0
        self._busy = False  # the last agreement found work: the next goes through `exchange`
        self.after_step = after_step
        self.turn: contextlib.AbstractContextManager = contextlib.nullcontext()
        self._holding = False  # `turn` taken for the last step, let go at the next agreement
        self.num_steps = 0  # group steps run, identical on every rank
        self.stop_requested = False  # set by this rank (any thread) to stop the whole group
        self.leave_requested = False  # this rank wants to leave; the group stops once all do
        self.stopped = False  # the group agreed to stop: step() returns None from now on
        nccl = dist.get_backend(group) == dist.Backend.NCCL
        self.flag_device = engine.device if nccl else torch.device("cpu")
        # a gang of one agrees with itself: no all-reduce (on CPU each one hands the tensor to
        # gloo's worker thread and back, ~1.5 ms per step when the cores are busy)
        self.alone = dist.get_world_size(group) == 1

    def step(self, bell: int = 0) -> list[RequestOutput] | None:
        """One group step: outputs of this rank, or None when no rank of the group has work (or
        the group agreed to stop: see `stopped`). `bell`: the doorbell's `count()` this rank
        read before it last took in queued work (see the class)."""
        if self.stopped:
            return None
        values = [
            int(self.engine.has_unfinished()),
            int(self.stop_requested),
            int(not self.leave_requested),
            -bell,  # the max of minus the counts: their min
        ]
        if self.alone:
            work, stop, stay, minus_rung = values
        elif self.exchange is not None and self._busy:
            work, stop, stay, minus_rung = max_over_ranks_shm(values, self.exchange)
        else:
            work, stop, stay, minus_rung = max_over_ranks(values, self.group, self.flag_device)
        self.rung = -minus_rung
        self.num_agreements += 1
        self.let_go()  # every rank is here: the group's last step is over on all of them
        stop = stop or not stay
        self._busy = bool(work) and not stop
        if stop:
            self.stopped = True
        if stop or not work:
            return None
        self.turn.__enter__()
        self._holding = True
        try:
            outputs = self.engine.step(participate=True)
        except BaseException:
            self.let_go()
            raise
        self.num_steps += 1
        if self.after_step is not None:
            self.after_step(self.num_steps)
        return outputs

    def let_go(self) -> None:
        """Give back the turn taken for the last step, if any (the next agreement does; the
        rank's loop does when it ends)."""
        if self._holding:
            self._holding = False
            self.turn.__exit__(None, None, None)

    def sleep_idle(self, timeout_s: float) -> bool:
        """After an idle agreement: sleep until a rank of the group rings (True: agree again)
        or `timeout_s` passes (False). Needs the doorbell. Raises PeerLost when a peer process
        has exited or left meanwhile (a sleeping group would not notice otherwise)."""
        assert self.exchange is not None and self.doorbell is not None
        if self.doorbell.wait(self.rung, timeout_s):
            return True
        ex = self.exchange
        ex.check_peers({r for r in range(ex.world) if r != ex.rank})
        return False

    def run_until_idle(self) -> list[RequestOutput]:
        """Step until every rank's requests are done; returns this rank's finished outputs."""
        finished: list[RequestOutput] = []
        while (outputs := self.step()) is not None:
            finished += [o for o in outputs if o.finished]
        return finished


class IdleBackoff:
    """Sleep between idle polls, growing from `min_s` to `max_s`; reset when work appears."""

    def __init__(self, min_s: float = 0.002, max_s: float = 0.05) -> None:
        self.min_s, self.max_s = min_s, max_s
        self.current = min_s

    def idle(self) -> None:
        time.sleep(self.current)
        self.grow()

    def grow(self) -> None:
        self.current = min(self.max_s, self.current * 2)

    def busy(self) -> None:
        self.current = self.min_s
