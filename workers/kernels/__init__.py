"""Optional C++ CPU kernels, built once by `make install` (`python -m workers.kernels.build`).

`routed_ffn` (the fused routed-expert FFN, `moe.cpp`), `paged_decode_attention` (decode
attention reading K/V in place, `attention.cpp`), `prefill_attention` (causal prefill
attention without a mask tensor, `prefill.cpp`), `linear` (projections of up to a few
hundred rows over packed weights, `linear.cpp`), `rms_norm` (`norm.cpp`), `rope_qk` (q/k norm,
rotary and KV write, `rope.cpp`), `softmax_topk` and `group_pairs` (routing, `route.cpp`),
`greedy_rows` (the sampler's pass, `greedy.cpp`) and `ep_plan` / `ep_pack` / `ep_unpack` /
`ep_combine` (the expert-parallel dispatch over shared memory, `ep.cpp`) return None (rope_qk,
ep_pack: False) when the kernel is not built (no compiler on the machine), disabled
(`MOE_KERNELS=0`) or cannot take the tensors (not on the CPU, autograd on, a dtype it lacks):
callers then use their pure-torch path, which computes the same thing. The build lives in
`_build/<hash of the sources>/`, so a changed source is never loaded stale.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

__all__ = [
    "SOURCES",
    "Panels",
    "build_dir",
    "enabled",
    "ep_combine",
    "ep_pack",
    "ep_plan",
    "ep_unpack",
    "fma_peak",
    "greedy_rows",
    "group_pairs",
    "kernel",
    "linear",
    "pack_panels",
    "paged_decode_attention",
    "prefill_attention",
    "rms_norm",
    "rope_qk",
    "routed_ffn",
    "softmax_topk",
]

HERE = Path(__file__).parent
SOURCES = [
    HERE / n
    for n in (
        *("ops.cpp", "moe.cpp", "attention.cpp", "prefill.cpp", "linear.cpp", "norm.cpp"),
        "rope.cpp",
        *("route.cpp", "greedy.cpp", "ep.cpp", "peak.cpp", "kernels.h", "gemm.h"),
    )
]
NAME = "moe_kernels"


def build_dir(pinned: bool = True) -> Path:
    """`_build/<hash of the sources and torch's version>/`; `MOE_KERNELS_BUILD=<hash>` loads an
    older build instead (benchmarks: a change against the build before it, in one window);
    `pinned=False`: the current sources' directory whatever the environment (the build)."""
    if pinned and os.environ.get("MOE_KERNELS_BUILD"):
        return HERE / "_build" / os.environ["MOE_KERNELS_BUILD"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES))
    digest.update(torch.__version__.encode())
    return HERE / "_build" / digest.hexdigest()[:16]


def enabled() -> bool:
    return os.environ.get("MOE_KERNELS", "1") != "0"


@cache
def _module():
    so = next(build_dir().glob(f"{NAME}*.so"), None)
    if so is None:
        return None
    spec = importlib.util.spec_from_file_location(NAME, so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel(name: str) -> Callable | None:
    """The built kernel `name`, or None (not built, MOE_KERNELS=0, or an older build named by
    MOE_KERNELS_BUILD that predates it)."""
    if not enabled():
        return None
    module = _module()
    return None if module is None else getattr(module, name, None)


def _cpu_kernel(name: str, *tensors: torch.Tensor, fp32: bool = True) -> Callable | None:
    """The kernel `name` when it can take `tensors`: built and on, every tensor on the CPU (and
    fp32 when `fp32`), autograd off; else None."""
    if torch.is_grad_enabled() or any(
        t.device.type != "cpu" or (fp32 and t.dtype != torch.float32) for t in tensors
    ):
        return None
    return kernel(name)


# `linear` takes products of at most PACKED_ROWS rows: there its packed panels measured ahead
# of ATen's sgemm on 2 threads at every width (`python -m bench.gemm`: 8-512 rows); at 2,048
# rows (a long prefill chunk) the two were even, and ATen keeps what it is tuned for.
PACKED_ROWS = 512


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, panels: Panels
) -> torch.Tensor | None:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], reading weight packed (kept in
    `panels`, made on the first call that runs here); None when ATen is the better (or only)
    choice here: not fp32 on the CPU, autograd on, or more than PACKED_ROWS rows."""
    n, k = weight.shape
    rows = x.numel() // k if k else 0
    if rows == 0 or rows > PACKED_ROWS:
        return None
    fn = _cpu_kernel("linear", x, weight)
    if fn is None:
        return None
    (packed,) = panels.of(weight)
    y = fn(x.reshape(rows, k).contiguous(), packed, n, bias)
    return y.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dim of fp32 x [..., D] with weight [D]; None when the kernel
    cannot run here (use the torch path)."""
    fn = _cpu_kernel("rms_norm", x, weight)
    if fn is None:
        return None
    return fn(x, weight.detach(), eps)


def rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    norms: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
    cache: torch.Tensor,
    slots: torch.Tensor,
) -> bool:
    """GQA's step between projections and attention in one C++ pass (rope.cpp): q [T, Hq, D]
    and k [T, Hkv, D] per-head RMSNorm'd by `norms` (q's and k's weights [D], or None) and
    NeoX-rotated by cos, sin [T, D], in place; then cache [S, 2, Hkv, D][slots] = (k, v).
    False (nothing done) when the kernel cannot run here: use the torch path."""
    tensors = (q, k, v, *cos_sin, cache, *(norms or ()))
    if not all(t.is_contiguous() for t in tensors) or cache.shape[1:] != (2, *k.shape[1:]):
        return False
    fn = _cpu_kernel("rope_qk", *tensors)
    if fn is None:
        return False
    qw, kw = (w.detach() for w in norms) if norms is not None else (None, None)
    fn(q, k, *cos_sin, qw, kw, eps, cache, slots, v)
    return True


def softmax_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Softmax top-k gating in one C++ call (route.cpp): logits [T, E] fp32 -> ids [T, K]
    int64, weights [T, K] fp32; None when the kernel cannot run here."""
    fn = _cpu_kernel("softmax_topk", logits)
    return None if fn is None else fn(logits, top_k, renormalize)


def group_pairs(
    ids: torch.Tensor, weights: torch.Tensor, expert_map: torch.Tensor, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """ids [T, K] global expert ids, weights [T, K] fp32, expert_map [E] (local expert or -1)
    -> (tokens [N], weights [N], counts [El] int64): the owned (token, expert) pairs grouped by
    local expert, (token, k) order within each (route.cpp); None when it cannot run here."""
    fn = _cpu_kernel("group_pairs", weights, expert_map, fp32=False)
    if fn is None or weights.dtype != torch.float32 or ids.device.type != "cpu":
        return None
    return fn(ids.contiguous(), weights.contiguous(), expert_map.contiguous(), num_local)


def greedy_rows(logits: torch.Tensor) -> tuple[list[int], list[bool]] | None:
    """logits [N, V] fp32 -> per row torch.argmax's index and whether every logit is finite,
    in one pass (greedy.cpp); None when the kernel cannot run here."""
    fn = _cpu_kernel("greedy_rows", logits)
    if fn is None or logits.dim() != 2 or logits.shape[1] == 0:
        return None
    ids, finite = fn(logits)
    return ids.tolist(), finite.tolist()


def fma_peak(iters: int = 50_000_000) -> float | None:
    """This CPU's fp32 multiply-add throughput over torch's intra-op threads, GFLOP/s (peak.cpp:
    register-only chains at the kernels' instruction set; ~0.1 s per 50M iterations at 4 GHz);
    None when the kernels are not built."""
    fn = kernel("fma_peak")
    if fn is None:
        return None
    fn(iters // 10)  # wake the threads and let the clock settle
    return max(fn(iters)[0] for _ in range(3))


def ep_plan(
    ids: torch.Tensor, expert_to_rank: torch.Tensor, world: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ids [T, K] int64 expert ids, expert_to_rank [E] -> (send_token [S] ordered by (rank,
    token), counts [W] int64): each token once per rank owning one of its experts (ep.cpp)."""
    fn = _cpu_kernel("ep_plan", ids, expert_to_rank, fp32=False)
    if fn is None or ids.dtype != torch.int64:
        return None
    return fn(ids, expert_to_rank.to(torch.int64), world)


def ep_pack(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    out: torch.Tensor,
) -> bool:
    """One peer's dispatch message into `out` (uint8 [n * (H * x.element_size() + 2K * 8)]):
    x's `rows`, then their ids and fp32 weight bits as int64 [n, 2K]; False when the kernel
    cannot run here (ep.cpp)."""
    fn = _cpu_kernel("ep_pack", x, ids, weights, rows, out, fp32=False)
    if fn is None or weights.dtype != torch.float32 or not x.is_contiguous():
        return False
    fn(x, ids.contiguous(), weights.contiguous(), rows, out)
    return True


def ep_unpack(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    own: torch.Tensor,
    messages: list[torch.Tensor],
    counts: list[int],
    recv_x_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """This rank's `own` rows of x, then each peer's message (`counts` rows each, rank order)
    -> (recv_x [R, H] in recv_x_out's first rows, recv_ids [R, K], recv_weights [R, K] fp32);
    None when the kernel cannot run here (ep.cpp)."""
    fn = _cpu_kernel("ep_unpack", x, ids, weights, own, recv_x_out, *messages, fp32=False)
    if fn is None or weights.dtype != torch.float32 or not x.is_contiguous():
        return None
    return fn(x, ids.contiguous(), weights.contiguous(), own, messages, counts, recv_x_out)


def ep_combine(
    own: torch.Tensor,
    parts: list[torch.Tensor | None],
    send_token: torch.Tensor,
    send_splits: list[int],
    me: int,
    num_tokens: int,
) -> torch.Tensor | None:
    """[T, H] fp32: per token the sum of its rows, one rank at a time in rank order (this
    rank's from `own`, the others' from `parts`), as index_add_ would; None when the kernel
    cannot run here (ep.cpp)."""
    fn = _cpu_kernel("ep_combine", own, *(p for p in parts if p is not None))
    if fn is None:
        return None
    return fn(own, parts, send_token, send_splits, me, num_tokens)


PACK = 16  # output columns per packed panel (gemm.h)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """[..., N, K] Linear-layout weights -> [..., ceil(N / 16), K, 16], zero padded: the layout
    gemm.h's packed product streams (one sequential run of memory per 16 outputs)."""
    *lead, n, k = w.shape
    panels = -(-n // PACK)
    padded = torch.nn.functional.pad(w.detach(), (0, 0, 0, panels * PACK - n))  # [..., P*16, K]
    return padded.view(*lead, panels, PACK, k).transpose(-2, -1).contiguous()


class Panels:
    """A packed copy (`pack_panels`) of some weights, made on first use and remade when one of
    them is changed in place or replaced (its storage or version counter moved). CPU fp32
    only: a second copy of those weights in memory."""

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int], ...] | None = None
        self._packed: tuple[torch.Tensor, ...] = ()

    def of(self, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if key != self._key:
            self._packed = tuple(pack_panels(w) for w in weights)
            self._key = key
        return self._packed


def routed_ffn(
    x: torch.Tensor,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    counts: list[int] | torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    packed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """x [T, H], tokens [N] grouped by expert, weights [N], counts [El], w13 [El, 2I, H],
    w2 [El, H, I] (and optionally both through `pack_panels`, which the few-row items then
    read) -> [T, H]; None when the kernel cannot run here (use the torch path)."""
    fn = _cpu_kernel("routed_ffn", x, fp32=False)
    if fn is None:
        return None
    counts_t = (
        counts if isinstance(counts, torch.Tensor) else torch.tensor(counts, dtype=torch.int64)
    )
    w13p, w2p = packed if packed is not None else (None, None)
    return fn(x.contiguous(), tokens, weights, counts_t, w13.detach(), w2.detach(), w13p, w2p)


PREFILL_GROUP = 48  # query heads per KV head the prefill kernel takes (prefill.cpp MAXM)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part, scale: float
) -> torch.Tensor | None:
    """A prefill part's causal attention (prefill.cpp): q [T, Hq, D] (the step's queries), k
    [b, L, Hkv, D] and v [b, L, Hkv, Dv] (the part's gathered contexts), `part` an
    AttentionPart -> [n, Hq, Dv], the part's tokens sequence by sequence; None when the kernel
    cannot run here (not built or off, not fp32 on the CPU, Dv not a multiple of 16, more than
    PREFILL_GROUP query heads per KV head: DeepSeek-V3's absorbed MLA has 128 over one)."""
    fn = _cpu_kernel("prefill_attention", q, k, v)
    hq, hkv = q.shape[1], k.shape[2]
    if fn is None or v.shape[-1] % 16 or hq % hkv or hq // hkv > PREFILL_GROUP:
        return None
    if q.shape[-1] != k.shape[-1]:  # the kernel reads both as D wide
        return None
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    return fn(q, k, v, part.query_index[:, 0], part.num_new, part.context_lens, scale)


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, part, layout, scale: float):
    """One decode part's attention read in place from `cache` (see attention.cpp): q [T, Hq, Dk]
    (the step's queries), `part` an AttentionPart with Q = 1, `layout` a KVLayout ->
    [b, Hq, Dv] in the part's order; None when the kernel cannot run here."""
    fn = _cpu_kernel("paged_decode_attention", q, cache)
    if fn is None:
        return None
    qp = q.index_select(0, part.query_index[:, 0])  # [b, Hq, Dk]
    return fn(
        qp,
        cache,
        part.context_slots,
        part.context_lens,
        layout.num_kv_heads,
        layout.k_offset,
        layout.k_head_stride,
        layout.v_offset,
        layout.v_head_stride,
        layout.v_dim,
        scale,
    )
