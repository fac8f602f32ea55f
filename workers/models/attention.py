"""Paged attention with plain torch ops (runs on CPU and CUDA).

Legend: T new tokens in the step (all sequences, flattened), B sequences, Q most new tokens of one
sequence in this step, L longest context of one sequence (cached + new), S cache slots
(num_blocks * block_size). A cache slot is `block_id * block_size + offset`.

One `AttentionMetadata` is built per engine step and shared by every layer: each layer writes the
new tokens' KV into its cache at `slot_mapping`, gathers each sequence's whole context through
`context_slots`, and runs one padded SDPA over [B, Q] queries x [B, L] keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AttentionMetadata", "attend", "gather_context", "write_kv"]


@dataclass(frozen=True)
class AttentionMetadata:
    """Where one step's tokens sit in the paged KV cache. Built once per step."""

    positions: torch.Tensor  # [T] int64: absolute position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's KV is written to
    context_slots: torch.Tensor  # [B, L] int64: cache slots of each sequence's context (pad: 0)
    query_index: torch.Tensor  # [B, Q] int64: row in T of each padded query (pad: last real row)
    token_index: torch.Tensor  # [T] int64: row of each token in the flattened [B * Q] queries
    mask: torch.Tensor  # [B, 1, Q, L] bool: True where a query may attend a key (causal + length)
    last_token_index: torch.Tensor  # [B] int64: row in T of each sequence's last new token

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_slots.shape[0])

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> AttentionMetadata:
        """A step with no tokens: an idle rank still runs its MoE layers' collectives."""
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return AttentionMetadata(
            positions=none,
            slot_mapping=none,
            context_slots=none.view(0, 0),
            query_index=none.view(0, 0),
            token_index=none,
            mask=torch.zeros(0, 1, 0, 0, dtype=torch.bool, device=device),
            last_token_index=none,
        )

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
        b = len(num_new)
        q = max(num_new)
        ctx = [c + n for c, n in zip(num_cached, num_new, strict=True)]
        width = max(ctx)
        positions: list[int] = []
        slots: list[int] = []
        for cached, new, table in zip(num_cached, num_new, block_tables, strict=True):
            for p in range(cached, cached + new):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        nb = (width + block_size - 1) // block_size
        tables = torch.zeros(b, nb, dtype=torch.int64)
        for i, table in enumerate(block_tables):
            used = (ctx[i] + block_size - 1) // block_size
            tables[i, :used] = torch.as_tensor(table[:used], dtype=torch.int64)
        offsets = torch.arange(block_size, dtype=torch.int64)
        context_slots = (tables[:, :, None] * block_size + offsets).reshape(b, nb * block_size)
        context_slots = context_slots[:, :width]  # [B, L]

        new_t = torch.as_tensor(list(num_new), dtype=torch.int64)  # [B]
        cached_t = torch.as_tensor(list(num_cached), dtype=torch.int64)  # [B]
        starts = torch.cumsum(new_t, 0) - new_t  # [B] first row in T of each sequence
        qi = torch.arange(q, dtype=torch.int64)[None, :]  # [1, Q]
        q_clamped = torch.minimum(qi, (new_t - 1)[:, None])  # [B, Q] pad rows repeat the last
        query_index = starts[:, None] + q_clamped  # [B, Q]
        q_pos = cached_t[:, None] + q_clamped  # [B, Q]
        mask = torch.arange(width)[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]
        seq_of_token = torch.repeat_interleave(torch.arange(b), new_t)  # [T]
        row_in_seq = torch.arange(int(new_t.sum())) - starts[seq_of_token]  # [T]
        token_index = seq_of_token * q + row_in_seq  # [T]
        return AttentionMetadata(
            positions=torch.as_tensor(positions, dtype=torch.int64).to(device),
            slot_mapping=torch.as_tensor(slots, dtype=torch.int64).to(device),
            context_slots=context_slots.to(device),
            query_index=query_index.to(device),
            token_index=token_index.to(device),
            mask=mask[:, None].to(device),
            last_token_index=(starts + new_t - 1).to(device),
        )


def write_kv(cache: torch.Tensor, meta: AttentionMetadata, values: torch.Tensor) -> None:
    """Store the new tokens' cache entries: cache [S, *shape] <- values [T, *shape]."""
    cache.index_copy_(0, meta.slot_mapping, values.to(cache.dtype))


def gather_context(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Each sequence's whole context from a layer's cache: [S, *shape] -> [B, L, *shape]."""
    return cache[meta.context_slots]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of the step's queries over each sequence's context.

    q [T, Hq, Dk] (new tokens), k [B, L, Hkv, Dk], v [B, L, Hkv, Dv] (whole contexts, already
    including this step's tokens) -> [T, Hq, Dv]. Hq must be a multiple of Hkv (GQA): query head
    h reads KV head h // G (G = Hq / Hkv), as in transformers' repeat_kv. The G query heads of
    one KV head are folded into the query axis instead of copying K/V G times.
    """
    b, _, hkv, dk = k.shape
    hq, dv = q.shape[1], v.shape[-1]
    g = hq // hkv
    qp = q[meta.query_index]  # [B, Q, Hq, Dk]
    nq = qp.shape[1]
    qg = qp.view(b, nq, hkv, g, dk).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * nq, dk)
    mask = meta.mask if g == 1 else meta.mask.repeat(1, 1, g, 1)  # [B, 1, G*Q, L]
    out = F.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, Hkv, G*Q, Dv]
    out = out.view(b, hkv, g, nq, dv).permute(0, 3, 1, 2, 4).reshape(b * nq, hq, dv)
    return out[meta.token_index]
