"""Expert-parallel token dispatch and combine: send each token to the ranks that own its experts,
bring the expert outputs back and sum them at the source.

Legend: T tokens on this rank, H hidden, K experts per token, E routed experts (global), W ranks
in the group, S rows this rank sends (unique (token, destination rank) pairs, self included),
R rows this rank receives (one per (source token, this rank) pair).

Collective-ordering hazard: `AllToAllDispatcher.dispatch` and `combine` are collectives. Every
rank of the group must call them for every MoE layer, in the same order, every step, even with
zero tokens (T = 0): a rank that skips a layer, or calls layers in another order, deadlocks or
silently receives another layer's rows. Call `combine` for a handle before the next `dispatch`
on the same group. The receiver's work between the two is `RoutedExperts` on (recv_x,
recv_topk_ids, recv_topk_weights): it ignores the experts of each row owned elsewhere.
`Dispatched.recv_x` lives in a buffer the dispatcher reuses: it is valid until the next
`dispatch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal, cast, get_args

import torch
import torch.distributed as dist

from workers import kernels
from workers.moe.shm_exchange import ShmExchange

__all__ = [
    "AllToAllDispatcher",
    "DispatchCounters",
    "DispatchHandle",
    "Dispatched",
    "LocalDispatcher",
    "Traffic",
    "Transport",
    "make_dispatcher",
]

BACKENDS = ("auto", "local", "all_to_all")
Transport = Literal["auto", "shm", "collective"]  # how AllToAllDispatcher moves rows
TRANSPORTS: tuple[str, ...] = get_args(Transport)


@dataclass(frozen=True)
class DispatchHandle:
    """What `combine` needs to route expert outputs back; valid only for the dispatch that made it.

    send_token: [S] int64 on x.device, the source token of each sent row, ordered by destination
        rank, then token; a token appears at most once per destination rank.
    send_splits: [W] rows sent to each rank (combine gets this many back from each).
    recv_splits: [W] rows received from each rank (combine returns this many to each).
    num_tokens: T, the number of rows `combine` returns.
    """

    send_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


@dataclass(frozen=True)
class Dispatched:
    """Rows received by this rank, grouped by source rank (this rank's own first, then the
    others ascending), then by source token."""

    recv_x: torch.Tensor  # [R, H] x.dtype: one row per (source token, this rank) pair
    recv_topk_ids: torch.Tensor  # [R, K] int64: the full top-k row, global expert ids
    recv_topk_weights: torch.Tensor  # [R, K] fp32: the full top-k weights
    handle: DispatchHandle


@dataclass
class Traffic:
    """Dispatch payload of one rank and layer: x rows only, H * dtype size bytes each. The top-k
    ids and weights, the counts exchange and combine's return trip (the same rows back, in
    expert_out's dtype) are not counted. Rows a rank keeps (its own experts' tokens) never
    enter the collective: they are counted in `*_self`, never in `*_sent` / `*_received`.
    Per dispatch: tokens_sent + tokens_self = sum over tokens of their unique destination ranks,
    and bytes_* = tokens_* * H * x.element_size()."""

    tokens_sent: int = 0  # rows sent to other ranks
    tokens_received: int = 0  # rows received from other ranks
    tokens_self: int = 0  # rows this rank sent to itself
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_self: int = 0

    def add(self, other: Traffic) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class DispatchCounters:
    """Per layer: `total` accumulates since the last `reset`; `last` is the latest dispatch."""

    total: dict[int, Traffic] = field(default_factory=dict)
    last: dict[int, Traffic] = field(default_factory=dict)

    def record(self, layer: int, step: Traffic) -> None:
        self.last[layer] = step
        self.total.setdefault(layer, Traffic()).add(step)

    def overall(self) -> Traffic:
        """`total` summed over layers."""
        out = Traffic()
        for t in self.total.values():
            out.add(t)
        return out

    def reset(self) -> None:
        self.total.clear()
        self.last.clear()


def _traffic(send_splits: list[int], recv_splits: list[int], me: int, row: int) -> Traffic:
    """Splits [W] of one dispatch on rank `me`, `row` bytes per x row -> its Traffic."""
    sent, recv = sum(send_splits) - send_splits[me], sum(recv_splits) - recv_splits[me]
    own = send_splits[me]
    return Traffic(sent, recv, own, sent * row, recv * row, own * row)


class LocalDispatcher:
    """One rank owns every expert: no communication; dispatch returns its inputs as they are
    (R = T, same tensors) and combine returns expert_out. Counts each token as sent to itself."""

    def __init__(self) -> None:
        self.counters = DispatchCounters()

    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int = 0
    ) -> Dispatched:
        t, h = x.shape
        self.counters.record(layer, _traffic([t], [t], 0, h * x.element_size()))
        send = torch.arange(t, device=x.device)
        handle = DispatchHandle(send_token=send, send_splits=[t], recv_splits=[t], num_tokens=t)
        return Dispatched(x, topk_ids, topk_weights, handle)

    def combine(
        self,
        expert_out: torch.Tensor,
        handle: DispatchHandle,
        overlap: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return expert_out if overlap is None else expert_out + overlap()


class AllToAllDispatcher:
    """Expert parallelism over a torch.distributed group with `all_to_all_single`.

    expert_to_rank: [E] int64, the group rank (not the global rank) owning each expert; the same
    on every rank. The process group's backend moves the tensors (NCCL for CUDA, gloo for CPU);
    everything is created on x.device. A dispatch is three collectives (counts [W] int64, x rows,
    packed ids + weights) and reads the counts on the host (a device sync on CUDA: split sizes
    are host lists); combine is one. See the module docstring for the ordering hazard.

    transport: on a CPU group whose ranks share one host, "auto" (and "shm") moves the rows
    through shared memory instead (`workers/moe/shm_exchange.py`: one exchange per dispatch, rows
    and ids + weights in one message that carries its own length, and one per combine; same
    rows, same order, same results); "collective" keeps the process group's all-to-alls. The
    constructor is then a collective too (every rank of the group builds its dispatcher
    together), and "shm" falls back to the collectives where shared memory cannot be used.
    """

    def __init__(
        self,
        expert_to_rank: torch.Tensor,
        group: dist.ProcessGroup | None = None,
        transport: str = "auto",
        timeout_s: float = 120.0,
    ):
        if transport not in TRANSPORTS:
            raise ValueError(
                f"unknown dispatch transport {transport!r}; choose one of {TRANSPORTS}"
            )
        if not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher needs torch.distributed.init_process_group()")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        e2r = torch.as_tensor(expert_to_rank).to("cpu", torch.int64)
        if e2r.dim() != 1 or e2r.numel() == 0:
            raise ValueError(
                f"expert_to_rank must be a non-empty [E] tensor, got {tuple(e2r.shape)}"
            )
        lo, hi = int(e2r.min()), int(e2r.max())
        if lo < 0 or hi >= self.world:
            raise ValueError(
                f"expert_to_rank values must be group ranks in [0, {self.world}), got [{lo}, {hi}]"
            )
        self.expert_to_rank = e2r  # [E]
        self._e2r_on: dict[torch.device, torch.Tensor] = {}  # copies per device, made on first use
        self.counters = DispatchCounters()
        # Wire buffers reused across layers and steps (grown, never shrunk): fresh temporaries
        # of a few MB per collective page-fault on every call, which measured as most of the
        # dispatch overhead over a bare all_to_all_single (bench/dispatch.py).
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self.shm: ShmExchange | None = None
        self._bytes = torch.empty(0, dtype=torch.uint8)  # `like` of the message buffers
        if transport != "collective" and dist.get_backend(group) == dist.Backend.GLOO:
            self.shm = ShmExchange.create(group, timeout_s=timeout_s)

    def set_timeout(self, timeout_s: float) -> None:
        """How long the shared-memory exchange waits on a peer before failing (the process
        group's own collectives have theirs)."""
        if self.shm is not None:
            self.shm.timeout_s = timeout_s

    def close(self) -> None:
        """Release the shared memory (peers waiting on this rank fail at once). Idempotent."""
        if self.shm is not None:
            self.shm.close()

    def _buffer(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A [rows, *like.shape[1:]] view of the reusable buffer `name` (like's dtype/device)."""
        key, row = (name, like.dtype, like.device), math.prod(like.shape[1:])
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < rows * row:
            with torch.inference_mode(False):  # written in and out of inference mode alike
                buf = torch.empty(max(rows * row * 5 // 4, 1), dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[: rows * row].view(rows, *like.shape[1:])

    def _exchange(
        self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> torch.Tensor:
        """[sum(send_splits), ...] -> [sum(recv_splits), ...]; rows grouped by rank both sides."""
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(out, send, recv_splits, send_splits, group=self.group)
        return out

    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int = 0
    ) -> Dispatched:
        """x [T, H] any dtype, topk_ids [T, K] global ids, topk_weights [T, K] (sent as fp32)
        -> Dispatched. A token goes to each destination rank once, however many of its experts
        live there. Collective, even with T = 0: see the module docstring."""
        dev, (t, h) = x.device, x.shape
        ids = topk_ids.to(dev, torch.int64)  # [T, K]
        if self.shm is not None and dev.type == "cpu":
            return self._dispatch_shm(x, ids, topk_weights, layer)
        send_token, send_counts = self._plan(ids)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

        # this rank's own rows never cross the wire: gathered straight into the first block of
        # recv_x (a copy saved each way), the collective's self block empty
        me, n_self = self.rank, send_splits[self.rank]
        lo = sum(send_splits[:me])
        remote = torch.cat([send_token[:lo], send_token[lo + n_self :]])  # [S - n_self]
        wire_send, wire_recv = _without(send_splits, me), _without(recv_splits, me)
        recv_x = self._buffer("recv", x, sum(recv_splits))  # [R, H]: own rows, then the others
        send_x = torch.index_select(x, 0, remote, out=self._buffer("send", x, len(remote)))
        rows = dist.all_to_all_single(
            recv_x[n_self:], send_x, wire_recv, wire_send, group=self.group, async_op=True
        )
        torch.index_select(x, 0, send_token[lo : lo + n_self], out=recv_x[:n_self])
        # ids and weights travel as one int64 tensor [S, 2K], built and sent while the rows are
        # in flight: the fp32 weights' bits, widened int32 -> int64 and narrowed back, come out
        # exactly (no float conversion anywhere). Packing them into the x rows' bytes too (one
        # collective fewer) measured slower on CPU gloo: the copies of the wide rows cost more.
        packed = _pack_meta(ids, topk_weights.to(dev, torch.float32).contiguous())  # [T, 2K]
        meta = torch.cat(  # [R, 2K], in recv_x's order
            [
                packed.index_select(0, send_token[lo : lo + n_self]),
                self._exchange(packed.index_select(0, remote), wire_send, wire_recv),
            ]
        )
        rows.wait()
        k = ids.shape[1]
        recv_ids = meta[:, :k].contiguous()  # [R, K]
        recv_weights = meta[:, k:].to(torch.int32).view(torch.float32)  # [R, K]

        step = _traffic(send_splits, recv_splits, self.rank, h * x.element_size())
        self.counters.record(layer, step)
        handle = DispatchHandle(send_token, send_splits, recv_splits, num_tokens=t)
        return Dispatched(recv_x, recv_ids, recv_weights, handle)

    def _plan(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T, K] int64 -> (send_token [S] ordered by (rank, token), send_counts [W])."""
        dev, t = ids.device, ids.shape[0]
        if dev not in self._e2r_on:
            self._e2r_on[dev] = self.expert_to_rank.to(dev)
        dest = self._e2r_on[dev][ids]  # [T, K] rank owning each chosen expert
        to = torch.zeros(self.world, t, dtype=torch.bool, device=dev)  # [W, T]: t goes to rank d
        to.scatter_(0, dest.t(), True)  # dedupe: two experts on one rank set the same flag
        send_rank, send_token = to.nonzero(as_tuple=True)  # [S], [S] ordered by (rank, token)
        return send_token, torch.bincount(send_rank, minlength=self.world)  # [W] int64

    def _dispatch_shm(
        self, x: torch.Tensor, ids: torch.Tensor, topk_weights: torch.Tensor, layer: int
    ) -> Dispatched:
        """`dispatch` over shared memory: to each peer one message, its rows [n, H] then their
        ids + weights [n, 2K] int64; the receiver learns n from the message's length. With the
        kernels (ep.cpp) the plan, each message and the received rows are one call each."""
        assert self.shm is not None
        (t, h), me, k = x.shape, self.rank, ids.shape[1]
        x = x.contiguous()
        weights = topk_weights.to(torch.float32).contiguous()  # [T, K]
        planned = kernels.ep_plan(ids, self.expert_to_rank, self.world)
        send_token, send_counts = planned if planned is not None else self._plan(ids)
        send_splits = send_counts.tolist()
        row_x, row_meta = h * x.element_size(), 2 * k * 8
        packed: torch.Tensor | None = None  # [T, 2K] int64, the torch path's ids + weight bits
        sends: list[list[torch.Tensor] | None] = [None] * self.world
        start = 0
        for r, n in enumerate(send_splits):
            if r != me:
                rows = send_token[start : start + n]
                msg = self._buffer(f"to{r}", self._bytes, n * (row_x + row_meta))
                if kernels.ep_pack(x, ids, weights, rows, msg):
                    sends[r] = [msg]
                else:
                    packed = _pack_meta(ids, weights) if packed is None else packed
                    sends[r] = [x.index_select(0, rows), packed.index_select(0, rows)]
            start += n
        got = self.shm.exchange(sends)
        recv_splits = [
            send_splits[me] if r == me else _message_rows(got[r], row_x + row_meta, r)
            for r in range(self.world)
        ]
        self.counters.record(layer, _traffic(send_splits, recv_splits, me, row_x))
        handle = DispatchHandle(send_token, send_splits, recv_splits, num_tokens=t)
        recv_x = self._buffer("recv", x, sum(recv_splits))  # [R, H]: own rows, then the others
        lo = sum(send_splits[:me])
        own = send_token[lo : lo + send_splits[me]]
        peers = [r for r in range(self.world) if r != me]
        unpacked = kernels.ep_unpack(
            x,
            ids,
            weights,
            own,
            [cast(torch.Tensor, got[r]) for r in peers],  # every peer sent one (maybe empty)
            [recv_splits[r] for r in peers],
            recv_x,
        )
        if unpacked is not None:
            return Dispatched(*unpacked, handle=handle)
        packed = _pack_meta(ids, weights) if packed is None else packed
        meta = packed.new_empty(sum(recv_splits), 2 * k)  # [R, 2K]
        torch.index_select(x, 0, own, out=recv_x[: len(own)])
        torch.index_select(packed, 0, own, out=meta[: len(own)])
        at = len(own)
        for r in peers:
            got_r, n = got[r], recv_splits[r]
            if got_r is None or not n:
                continue
            recv_x[at : at + n].copy_(got_r[: n * row_x].view(x.dtype).view(n, h))
            meta[at : at + n].copy_(got_r[n * row_x :].view(torch.int64).view(n, 2 * k))
            at += n
        recv_ids = meta[:, :k].contiguous()  # [R, K]
        recv_weights = meta[:, k:].to(torch.int32).view(torch.float32)  # [R, K]
        return Dispatched(recv_x, recv_ids, recv_weights, handle)

    def _combine_shm(self, send: torch.Tensor, handle: DispatchHandle) -> list[torch.Tensor | None]:
        """Each peer's block of `send` [R, H] back to it; -> per rank the rows it returned,
        [send_splits[r], H] (None for this rank)."""
        assert self.shm is not None
        me, h = self.rank, send.shape[1]
        sends: list[list[torch.Tensor] | None] = [None] * self.world
        at = handle.recv_splits[me]
        for r, n in enumerate(handle.recv_splits):
            if r != me:
                sends[r] = [send[at : at + n]]
                at += n
        got = self.shm.exchange(sends)
        return [
            None if m is None else m.view(send.dtype).view(handle.send_splits[r], h)
            for r, m in enumerate(got)
        ]

    def combine(
        self,
        expert_out: torch.Tensor,
        handle: DispatchHandle,
        overlap: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """expert_out [R, H] (rows in `Dispatched` order) -> y [T, H] in expert_out.dtype: per
        source token, the sum of the partial outputs of every rank it went to. Collective.

        `overlap` (e.g. the shared experts) runs while the all-to-all is in flight; its [T, H]
        result is added after the routed sum, the same order as without expert parallelism.
        Deterministic, also on CUDA: partials are added one destination rank at a time in rank
        order, and inside one rank's block a token appears once, so index_add_ never collides."""
        send = expert_out.contiguous()
        me, n_self = self.rank, handle.send_splits[self.rank]
        if self.shm is not None and send.device.type == "cpu":
            extra = overlap() if overlap is not None else None
            parts = self._combine_shm(send, handle)
            y = kernels.ep_combine(
                send, parts, handle.send_token, handle.send_splits, me, handle.num_tokens
            )
            if y is not None:
                return y if extra is None else y + extra
        else:
            back = self._buffer("back", send, sum(handle.send_splits) - n_self)  # [S - n_self, H]
            work = dist.all_to_all_single(
                back,
                send[n_self:],  # this rank's own rows came first and stay here
                _without(handle.send_splits, me),
                _without(handle.recv_splits, me),
                group=self.group,
                async_op=True,
            )
            extra = overlap() if overlap is not None else None
            work.wait()
            parts = list(back.split(_without(handle.send_splits, me)))  # this rank's block empty
        y = expert_out.new_zeros(handle.num_tokens, expert_out.shape[1])  # [T, H]
        start = 0
        for r, n in enumerate(handle.send_splits):  # in rank order, this rank's own included
            part = send[:n_self] if r == me else parts[r]
            if n:
                assert part is not None  # the shared-memory path has None at this rank only
                y.index_add_(0, handle.send_token[start : start + n], part)
            start += n
        return y if extra is None else y + extra


def _pack_meta(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ids [T, K] int64, weights [T, K] fp32 -> [T, 2K] int64: the ids, then the weights' bits
    widened int32 -> int64 (narrowed back on arrival: exact, no float conversion)."""
    return torch.cat([ids, weights.view(torch.int32).to(torch.int64)], dim=1)


def _message_rows(msg: torch.Tensor | None, row_bytes: int, src: int) -> int:
    size = 0 if msg is None else msg.numel()
    n, rest = divmod(size, row_bytes)
    if rest:
        raise RuntimeError(
            f"dispatch message from rank {src} is {size} bytes, not whole rows of "
            f"{row_bytes}: the ranks disagree on the hidden size or top-k"
        )
    return n


def _without(splits: list[int], rank: int) -> list[int]:
    """Split sizes with `rank`'s own block empty (rows a rank keeps never cross the wire)."""
    return [0 if r == rank else n for r, n in enumerate(splits)]


def make_dispatcher(
    backend: str = "auto",
    expert_to_rank: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    transport: str = "auto",
) -> LocalDispatcher | AllToAllDispatcher:
    """Pick a dispatcher by name: "local" (one rank, no communication), "all_to_all"
    (torch.distributed, needs expert_to_rank [E]), or "auto": all_to_all when torch.distributed
    is initialized and the group has more than one rank, else local. `transport`: how an
    all_to_all dispatcher moves rows (`AllToAllDispatcher`: "auto", "shm", "collective")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown dispatch backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        backend = "all_to_all" if multi else "local"
    if backend == "local":
        return LocalDispatcher()
    if expert_to_rank is None:
        raise ValueError(
            "the all_to_all dispatch backend needs expert_to_rank: an [E] int64 tensor giving "
            "the group rank that owns each expert"
        )
    return AllToAllDispatcher(expert_to_rank, group, transport)
