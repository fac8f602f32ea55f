"""Paged attention with plain torch ops (runs on CPU and CUDA).

Legend: T new tokens in the step (all sequences, flattened), B sequences, Q most new tokens of one
sequence in a part, L longest context of one sequence in a part (cached + new), S cache slots
(num_blocks * block_size). A cache slot is `block_id * block_size + offset`.

One `AttentionMetadata` is built per engine step and shared by every layer: each layer writes the
new tokens' KV into its cache at `slot_mapping`; then, for each part of the batch, gathers each
sequence's whole context through `context_slots` and runs one padded SDPA over [b, Q] queries x
[b, L] keys. Sequences of very different sizes are separate parts (`padding_groups`): padded
together, a step with one 1,000-token chunk and 63 decodes would compute 64 x 1,000 query rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from workers import kernels

__all__ = [
    "AttentionMetadata",
    "AttentionPart",
    "KVLayout",
    "paged_attention",
    "padding_groups",
    "write_kv",
]


@dataclass(frozen=True)
class AttentionPart:
    """Some of the step's sequences, whose queries are padded together."""

    rows: torch.Tensor | None  # [n] int64: rows in T of this part's tokens; None: all, in order
    context_slots: torch.Tensor  # [b, L] int64: cache slots of each sequence's context (pad: 0)
    query_index: torch.Tensor  # [b, Q] int64: row in T of each padded query (pad: last real row)
    token_index: torch.Tensor  # [n] int64: row of each of the part's tokens in the [b * Q] queries
    # [b, Q] int64: each padded query's position in its sequence; None when causal (SDPA's own
    # mask) or decode (the torch path's mask comes from context_lens, the kernel needs none)
    query_positions: torch.Tensor | None
    context_lens: torch.Tensor  # [b] int64: each sequence's context length (cached + new)
    num_new: torch.Tensor  # [b] int64: each sequence's new tokens (its last ones in context)
    decode: bool  # one new token per sequence (Q = 1)
    causal: bool  # nothing cached and every sequence Q long: SDPA's own causal mask, no `mask`
    _mask: list = field(default_factory=list, compare=False, repr=False)  # mask(), once made

    def mask(self) -> torch.Tensor:
        """[b, 1, Q, L] bool: True where a query may attend a key (causal + length), for SDPA.
        Made on first use and kept for the step's other layers; never when the C++ kernels run
        the part (a 2,048-token chunk after a 30,000-token prefix: 64 MB)."""
        if not self._mask:
            width = self.context_slots.shape[1]
            keys = torch.arange(width, device=self.context_lens.device)
            if self.decode:  # each sequence's one query sees its whole context
                mask = (keys[None, :] < self.context_lens[:, None])[:, None, None, :]
            else:
                positions = self.query_positions  # None when causal: query i at position i
                if positions is None:
                    positions = torch.arange(self.query_index.shape[1], device=keys.device)[None]
                mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
            self._mask.append(mask)
        return self._mask[0]


@dataclass(frozen=True)
class KVLayout:
    """Where one KV head's key and value sit in a token's cache row (in elements), for the
    kernel that reads them in place. GQA [2, Hkv, D]: k at h*D, v at Hkv*D + h*D; MLA's latent
    [C + R]: one head, k = the whole row (C + R), v = its first C."""

    num_kv_heads: int
    k_offset: int
    k_head_stride: int
    v_offset: int
    v_head_stride: int
    v_dim: int


@dataclass(frozen=True)
class AttentionMetadata:
    """Where one step's tokens sit in the paged KV cache. Built once per step."""

    positions: torch.Tensor  # [T] int64: absolute position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's KV is written to
    last_token_index: torch.Tensor  # [B] int64: row in T of each sequence's last new token
    parts: tuple[AttentionPart, ...]  # padded groups of sequences (`padding_groups`)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.last_token_index.shape[0])

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> AttentionMetadata:
        """A step with no tokens: an idle rank still runs its MoE layers' collectives."""
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return AttentionMetadata(positions=none, slot_mapping=none, last_token_index=none, parts=())

    @staticmethod
    def build(
        num_cached: Sequence[int],
        num_new: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for B sequences; sequence i has `num_cached[i]` tokens already in the cache and
        `num_new[i]` (>= 1) tokens computed in this step, its KV living in `block_tables[i]`."""
        if not (len(num_cached) == len(num_new) == len(block_tables)) or not num_new:
            raise ValueError("num_cached, num_new and block_tables must be non-empty, same length")
        positions: list[int] = []
        slots: list[int] = []
        for cached, new, table in zip(num_cached, num_new, block_tables, strict=True):
            for p in range(cached, cached + new):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        new_t = torch.as_tensor(list(num_new), dtype=torch.int64)  # [B]
        starts = torch.cumsum(new_t, 0) - new_t  # [B] first row in T of each sequence
        groups = padding_groups(num_cached, num_new)
        parts = tuple(
            _part(
                idx,
                [num_cached[i] for i in idx],
                new_t[idx],
                starts[idx],
                [block_tables[i] for i in idx],
                block_size,
                whole=len(groups) == 1,
                device=device,
            )
            for idx in groups
        )
        return AttentionMetadata(
            positions=torch.as_tensor(positions, dtype=torch.int64).to(device),
            slot_mapping=torch.as_tensor(slots, dtype=torch.int64).to(device),
            last_token_index=(starts + new_t - 1).to(device),
            parts=parts,
        )


# padded cells (queries x keys) a part may hold beyond its real ones before a sequence starts a
# new part: a few decodes or short chunks are cheaper padded together than as separate calls
PAD_SLACK_CELLS = 1 << 16


# On CUDA, attention runs on the flash or memory-efficient kernels, never cuDNN's: torch picks
# cuDNN first for bf16 on Hopper, and cuDNN builds a graph for each new shape. A step's context
# lengths change every step, so each call built one: 1.3-5.8 ms of CPU per attention call on an
# H200, 184 ms per DeepSeek-V3 decode step of one sequence (`python -m bench.cuda_steps`).
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(device: torch.device) -> AbstractContextManager:
    """The attention kernels a forward on `device` may use (see CUDA_SDPA_BACKENDS)."""
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if device.type == "cuda" else nullcontext()


def padding_groups(num_cached: Sequence[int], num_new: Sequence[int]) -> list[list[int]]:
    """Split a step's sequences into parts padded together, so padding costs at most about
    as much as the real work: a part's padded area b * Q * L stays within twice its sequences'
    sum of new * context (+ PAD_SLACK_CELLS). Sequences are taken shortest first (new tokens,
    then context). One part, in batch order, when that bound allows it; else parts in sorted
    order. Without this, 15 cache-hit tails of 64 tokens batched with one 1,088-token prompt
    are each padded to 1,088 queries: 16x the attention of the step."""
    ctx = [c + n for c, n in zip(num_cached, num_new, strict=True)]
    order = sorted(range(len(num_new)), key=lambda i: (num_new[i], ctx[i]))
    groups: list[list[int]] = []
    real = q = width = 0
    for i in order:
        if groups:
            nq, nw, nr = max(q, num_new[i]), max(width, ctx[i]), real + num_new[i] * ctx[i]
            if (len(groups[-1]) + 1) * nq * nw <= 2 * nr + PAD_SLACK_CELLS:
                groups[-1].append(i)
                real, q, width = nr, nq, nw
                continue
        groups.append([i])
        real, q, width = num_new[i] * ctx[i], num_new[i], ctx[i]
    if len(groups) == 1:
        return [list(range(len(num_new)))]
    return groups


def _part(
    idx: list[int],
    num_cached: list[int],
    new_t: torch.Tensor,
    starts: torch.Tensor,
    block_tables: list[Sequence[int]],
    block_size: int,
    *,
    whole: bool,
    device: torch.device | str,
) -> AttentionPart:
    """The padded layout of sequences `idx` (their new-token counts `new_t` [b] and first rows
    in T `starts` [b]); `whole`: they are the whole batch, in order."""
    b = len(idx)
    q = int(new_t.max())
    cached_t = torch.as_tensor(num_cached, dtype=torch.int64)  # [b]
    ctx = cached_t + new_t
    ctx_list = ctx.tolist()
    width = max(ctx_list)
    nb = (width + block_size - 1) // block_size
    used = [(c + block_size - 1) // block_size for c in ctx_list]
    tables = torch.tensor(  # [b, nb]: one tensor from Python lists, not a copy per sequence
        [[*table[:u], *([0] * (nb - u))] for table, u in zip(block_tables, used, strict=True)],
        dtype=torch.int64,
    )
    offsets = torch.arange(block_size, dtype=torch.int64)
    context_slots = (tables[:, :, None] * block_size + offsets).reshape(b, nb * block_size)
    context_slots = context_slots[:, :width]  # [b, L]
    if q == 1:  # decodes: sequence i's one query is row starts[i]; its mask only where read
        return AttentionPart(
            rows=None if whole else starts.to(device),
            context_slots=context_slots.to(device),
            query_index=starts[:, None].to(device),
            token_index=torch.arange(b, device=device),
            query_positions=None,
            context_lens=ctx.to(device),
            num_new=new_t.to(device),
            decode=True,
            causal=False,
        )
    qi = torch.arange(q, dtype=torch.int64)[None, :]  # [1, Q]
    q_clamped = torch.minimum(qi, (new_t - 1)[:, None])  # [b, Q] pad rows repeat the last
    query_index = starts[:, None] + q_clamped  # [b, Q]
    causal = q > 1 and width == q and bool((new_t == q).all())
    q_pos = None if causal else (cached_t[:, None] + q_clamped).to(device)  # [b, Q]
    local = torch.repeat_interleave(torch.arange(b), new_t)  # [n] the part's sequence of a token
    local_starts = torch.cumsum(new_t, 0) - new_t  # [b]
    row_in_seq = torch.arange(int(new_t.sum())) - local_starts[local]  # [n]
    rows = None if whole else (starts[local] + row_in_seq).to(device)
    return AttentionPart(
        rows=rows,
        context_slots=context_slots.to(device),
        query_index=query_index.to(device),
        token_index=(local * q + row_in_seq).to(device),
        query_positions=q_pos,
        context_lens=ctx.to(device),
        num_new=new_t.to(device),
        decode=q == 1,
        causal=causal,
    )


def write_kv(cache: torch.Tensor, meta: AttentionMetadata, values: torch.Tensor) -> None:
    """Store the new tokens' cache entries: cache [S, *shape] <- values [T, *shape]."""
    cache.index_copy_(0, meta.slot_mapping, values.to(cache.dtype))


def paged_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    layout: KVLayout | None = None,
) -> torch.Tensor:
    """Causal attention of the step's queries q [T, Hq, Dk] over each sequence's context in a
    layer's `cache` [S, *shape] (already holding this step's tokens) -> [T, Hq, Dv]. `kv` turns
    gathered contexts [b, L, *shape] into k [b, L, Hkv, Dk] and v [b, L, Hkv, Dv]. With
    `layout`, decode parts run the C++ kernel that reads K/V in place where it is built; other
    parts run the C++ prefill kernel on the gathered K/V where it can take them, else SDPA."""
    out: torch.Tensor | None = None
    for part in meta.parts:
        o = None
        if layout is not None and part.decode:
            o = kernels.paged_decode_attention(q, cache, part, layout, scale)
        if o is None:
            k, v = kv(cache[part.context_slots])
            if not part.decode:  # causal, no mask tensor, any value width (prefill.cpp)
                o = kernels.prefill_attention(q, k, v, part, scale)
            if o is None:
                o = _attend(q, k, v, part, scale)  # [n, Hq, Dv]
        if part.rows is None:
            return o
        if out is None:
            out = q.new_empty(q.shape[0], *o.shape[1:])
        out[part.rows] = o
    assert out is not None, "paged_attention needs at least one token"
    return out


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: AttentionPart, scale: float
) -> torch.Tensor:
    """One part's attention: q [T, Hq, Dk], k [b, L, Hkv, Dk], v [b, L, Hkv, Dv] -> [n, Hq, Dv].
    Hq must be a multiple of Hkv (GQA): query head h reads KV head h // G (G = Hq / Hkv), as in
    transformers' repeat_kv. The G query heads of one KV head are folded into the query axis
    instead of copying K/V G times.
    """
    b, _, hkv, dk = k.shape
    hq, dv = q.shape[1], v.shape[-1]
    g = hq // hkv
    if dv < dk and q.device.type == "cpu":
        # torch's CPU flash kernel needs V's head size equal to Q's and K's; otherwise SDPA
        # takes its math path (the [Q, L] scores in memory, then softmax and NaN checks over
        # them). DeepSeek's expanded MLA (q/k 192, v 128; 96 / 64 in the peer shape): V padded
        # with zeros, its output cut back: the peer shape's 3,000-token prefill 2.74 s ->
        # 1.40-1.59 s (`python -m bench.long_prefill`).
        v = F.pad(v, (0, dk - dv))
    qp = q[part.query_index]  # [b, Q, Hq, Dk]
    nq = qp.shape[1]
    if part.causal:  # whole prompts of one length: the flash kernel's causal mask, no bool mask
        qh = qp.transpose(1, 2)  # [b, Hq, Q, Dk]
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [b, Hkv, L, D]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=g > 1
        )[..., :dv]  # [b, Hq, Q, Dv]
        return out.transpose(1, 2).reshape(b * nq, hq, dv)[part.token_index]
    qg = qp.view(b, nq, hkv, g, dk).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * nq, dk)
    mask = part.mask()  # [b, 1, Q, L]
    mask = mask if g == 1 else mask.repeat(1, 1, g, 1)  # [b, 1, G*Q, L]
    out = F.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )[..., :dv]  # [b, Hkv, G*Q, Dv]
    out = out.reshape(b, hkv, g, nq, dv).permute(0, 3, 1, 2, 4).reshape(b * nq, hq, dv)
    return out[part.token_index]
