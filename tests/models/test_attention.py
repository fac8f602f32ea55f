"""Paged attention's padded parts: how a step's sequences are grouped, and that any grouping gives
the attention of each sequence computed on its own."""

from __future__ import annotations

import math

import pytest
import torch

from workers import kernels
from workers.models import attention
from workers.models.attention import (
    AttentionMetadata,
    KVLayout,
    padding_groups,
    paged_attention,
)
from workers.models.layers import RotaryTable, rotary_cos_sin


def test_tails_are_not_padded_to_a_long_prompt():
    # 15 cache-hit tails (64 new over 1,024 cached) and one whole 1,088-token prompt
    groups = padding_groups([1024] * 15 + [0], [64] * 15 + [1088])
    assert groups == [list(range(15)), [15]]


def test_alike_sequences_stay_one_part_in_batch_order():
    assert padding_groups([900, 10, 500, 3], [1, 1, 1, 1]) == [[0, 1, 2, 3]]
    assert padding_groups([0, 0, 0], [40, 36, 38]) == [[0, 1, 2]]


def test_decodes_split_from_a_chunk():
    groups = padding_groups([300] * 8 + [0], [1] * 8 + [1000])
    assert groups == [list(range(8)), [8]]


def _reference(q, cache, cached, new, tables, block, scale):
    """Each sequence on its own: plain causal softmax attention over its context."""
    out, row = [], 0
    for c, n, table in zip(cached, new, tables, strict=True):
        slots = [table[p // block] * block + p % block for p in range(c + n)]
        k = v = cache[torch.tensor(slots)]  # [L, H, D]
        for j in range(n):
            qj = q[row + j]  # [H, D]
            scores = torch.einsum("hd,lhd->hl", qj, k[: c + j + 1]) * scale
            out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v[: c + j + 1]))
        row += n
    return torch.stack(out)


@pytest.mark.parametrize("slack", [0, attention.PAD_SLACK_CELLS])
def test_any_grouping_equals_each_sequence_alone(monkeypatch, slack):
    monkeypatch.setattr(attention, "PAD_SLACK_CELLS", slack)
    gen = torch.Generator().manual_seed(0)
    block, heads, dim = 4, 2, 8
    cached, new = [12, 0, 5, 30, 7], [1, 17, 3, 1, 9]
    tables = [[i * 10 + j for j in range(10)] for i in range(5)]
    cache = torch.randn(60 * block, heads, dim, generator=gen)
    q = torch.randn(sum(new), heads, dim, generator=gen)
    meta = AttentionMetadata.build(cached, new, tables, block)
    assert (len(meta.parts) > 1) == (slack == 0)  # several parts, or one in batch order
    scale = 1 / math.sqrt(dim)
    got = paged_attention(q, cache, meta, lambda ctx: (ctx, ctx), scale)
    ref = _reference(q, cache, cached, new, tables, block, scale)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _decode_case(layout_kind: str, d: int = 8):
    gen = torch.Generator().manual_seed(1)
    block = 4
    cached = [12, 0, 5, 30, 7, 100]
    new = [1] * len(cached)
    tables = [[i * 30 + j for j in range(30)] for i in range(len(cached))]
    if layout_kind.startswith("gqa"):  # cache row [2, Hkv, D], 4 (gqa4: 8) query heads over 2
        hkv = 2
        cache = torch.randn(200 * block, 2, hkv, d, generator=gen)
        q = torch.randn(len(new), 8 if layout_kind == "gqa4" else 4, d, generator=gen)
        layout = KVLayout(hkv, 0, d, hkv * d, d, d)

        def kv(ctx):
            return ctx[:, :, 0], ctx[:, :, 1]

    else:  # MLA latent row [C + R], every query head on the one latent head, v = [:C]
        c, r = 12, 4
        cache = torch.randn(200 * block, c + r, generator=gen)
        q = torch.randn(len(new), 3, c + r, generator=gen)
        layout = KVLayout(1, 0, 0, 0, 0, c)

        def kv(ctx):
            return ctx[:, :, None], ctx[:, :, None, :c]

    return AttentionMetadata.build(cached, new, tables, block), q, cache, layout, kv


# head dims: 8 (one vector), 12 (a scalar tail), 64 and 136 (register blocks of 64 + rest);
# 2 query heads per KV head at 64 and 4 at 32 / 64 take the one-walk-for-all-heads values
@pytest.mark.parametrize(
    "layout_kind,d",
    [("gqa", 8), ("gqa", 12), ("gqa", 64), ("gqa", 136), ("gqa4", 32), ("gqa4", 64), ("mla", 0)],
)
def test_decode_kernel_equals_the_torch_path(layout_kind, d):
    if kernels.kernel("paged_decode_attention") is None:
        pytest.skip("the C++ kernels are not built here")
    meta, q, cache, layout, kv = _decode_case(layout_kind, d)
    assert [p.decode for p in meta.parts] == [True]
    with torch.no_grad():
        fast = paged_attention(q, cache, meta, kv, 0.3, layout)
        slow = paged_attention(q, cache, meta, kv, 0.3)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_fresh_prompts_of_one_length_use_the_causal_path(heads):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(3)
    block, dim = 4, 8
    cached, new = [0, 0], [13, 13]
    tables = [[i * 10 + j for j in range(10)] for i in range(2)]
    cache = torch.randn(30 * block, 2, hkv, dim, generator=gen)
    q = torch.randn(sum(new), hq, dim, generator=gen)
    meta = AttentionMetadata.build(cached, new, tables, block)
    assert [p.causal for p in meta.parts] == [True]
    got = paged_attention(q, cache, meta, lambda ctx: (ctx[:, :, 0], ctx[:, :, 1]), 0.4)
    g = hq // hkv
    out, row = [], 0
    for table, n in zip(tables, new, strict=True):
        slots = torch.tensor([table[p // block] * block + p % block for p in range(n)])
        k, v = cache[slots, 0], cache[slots, 1]  # [L, Hkv, D]
        for j in range(n):
            heads_out = []
            for h in range(hq):
                s = (k[: j + 1, h // g] @ q[row + j, h]) * 0.4
                heads_out.append(s.softmax(-1) @ v[: j + 1, h // g])
            out.append(torch.stack(heads_out))
        row += n
    torch.testing.assert_close(got, torch.stack(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("cached", "new"), [([0, 0], [13, 13]), ([12, 0, 5], [1, 17, 3])], ids=["causal", "masked"]
)
def test_values_narrower_than_keys(cached, new):
    """DeepSeek's expanded MLA: V's head size below Q's and K's (V padded for the CPU flash
    kernel, the output cut back): each sequence's plain softmax attention."""
    gen = torch.Generator().manual_seed(4)
    block, heads, dk, dv = 4, 3, 12, 8
    tables = [[i * 10 + j for j in range(10)] for i in range(len(new))]
    cache = torch.randn(40 * block, heads, dk, generator=gen)
    q = torch.randn(sum(new), heads, dk, generator=gen)
    meta = AttentionMetadata.build(cached, new, tables, block)
    assert [p.causal for p in meta.parts] == [len(set(new)) == 1 and not any(cached)]
    got = paged_attention(q, cache, meta, lambda ctx: (ctx, ctx[..., :dv]), 0.3)
    out, row = [], 0
    for c, n, table in zip(cached, new, tables, strict=True):
        slots = torch.tensor([table[p // block] * block + p % block for p in range(c + n)])
        k = cache[slots]  # [L, H, Dk]
        for j in range(n):
            s = torch.einsum("hd,lhd->hl", q[row + j], k[: c + j + 1]) * 0.3
            out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), k[: c + j + 1, :, :dv]))
        row += n
    assert got.shape == (sum(new), heads, dv)
    torch.testing.assert_close(got, torch.stack(out), atol=1e-5, rtol=0)


def test_rotary_table_rows_equal_the_computed_ones():
    """The cached cos/sin rows equal rotary_cos_sin's for the same positions, also after the
    table grows past its first size, and in another dtype."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    table = RotaryTable(inv_freq, 0.7)
    for positions in (torch.tensor([0, 5, 255]), torch.tensor([3, 700, 1]), torch.arange(40)):
        for dtype in (torch.float32, torch.bfloat16):
            got = table(positions, dtype)
            want = rotary_cos_sin(positions, inv_freq, 0.7, dtype)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == dtype
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert [t.shape for t in table(torch.zeros(0, dtype=torch.int64), torch.float32)] == [
        (0, 64),
        (0, 64),
    ]


# (cached, new) per sequence: one fresh prompt over several key blocks (the kernel's blocks
# are 128 keys), a chunk after a cached prefix, and a batch padded together (decodes among them)
PREFILL_CASES = {
    "fresh": ([0], [300]),
    "after-prefix": ([260], [77]),
    "batch": ([0, 5, 140, 3, 0], [7, 30, 1, 64, 129]),
}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
@pytest.mark.parametrize(
    "hq,hkv,dk,dv", [(8, 4, 64, 64), (4, 1, 20, 16), (3, 3, 24, 16), (16, 2, 32, 32)]
)
def test_prefill_kernel_equals_the_torch_path(monkeypatch, case, hq, hkv, dk, dv):
    """prefill.cpp against SDPA (the torch path, itself checked above): GQA groups of 1-8,
    key widths that are not a multiple of 8, values narrower than keys (MLA's expanded form),
    contexts over several of the kernel's key blocks, padded batches."""
    if kernels.kernel("prefill_attention") is None:
        pytest.skip("the C++ kernels are not built here")
    gen = torch.Generator().manual_seed(5)
    cached, new = PREFILL_CASES[case]
    block = 16
    tables = [[i * 40 + j for j in range(40)] for i in range(len(new))]
    cache = torch.randn(40 * len(new) * block, hkv, 2 * dk, generator=gen)
    q = torch.randn(sum(new), hq, dk, generator=gen)
    meta = AttentionMetadata.build(cached, new, tables, block)

    def kv(ctx):  # keys and values as strided views of the cache rows, as the models give them
        return ctx[..., :dk], ctx[..., dk : dk + dv]

    ran = []
    real = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *a: ran.append(1) or real(*a))
    with torch.no_grad():
        fast = paged_attention(q, cache, meta, kv, 0.3)
        assert len(ran) == sum(not p.decode for p in meta.parts) > 0
        monkeypatch.setenv("MOE_KERNELS", "0")
        slow = paged_attention(q, cache, meta, kv, 0.3)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)


def test_prefill_kernel_leaves_what_it_lacks_to_torch():
    """Value widths that are not a multiple of 16, queries wider than the keys, more query heads
    per KV head than a work item holds (DeepSeek-V3's absorbed MLA: 128): None, so the caller
    runs SDPA."""
    if kernels.kernel("prefill_attention") is None:
        pytest.skip("the C++ kernels are not built here")
    part = AttentionMetadata.build([0], [5], [[0]], 16).parts[0]
    q, k = torch.randn(5, 2, 16), torch.randn(1, 5, 2, 16)
    with torch.no_grad():
        assert kernels.prefill_attention(q, k, k, part, 0.3) is not None
        assert kernels.prefill_attention(q, k, k[..., :8], part, 0.3) is None
        assert kernels.prefill_attention(q[..., :8], k, k, part, 0.3) is None
        many = torch.randn(5, kernels.PREFILL_GROUP + 2, 16)  # one KV head for all of them
        assert kernels.prefill_attention(many, k[:, :, :1], k[:, :, :1], part, 0.3) is None


def test_the_mask_is_made_once_and_only_when_read():
    """Prefill parts keep their queries' positions, not a [b, 1, Q, L] mask: the C++ kernel never
    reads one; SDPA's path makes it on first use and every later layer gets the same tensor."""
    meta = AttentionMetadata.build([3, 0], [2, 5], [[0], [1]], 8)
    (part,) = meta.parts
    assert part.query_positions.tolist() == [[3, 4, 4, 4, 4], [0, 1, 2, 3, 4]]  # pads repeat
    mask = part.mask()
    assert part.mask() is mask
    assert mask[:, 0].tolist() == [
        [[True] * 4 + [False]] + [[True] * 5] * 4,
        [[True] * (i + 1) + [False] * (4 - i) for i in range(5)],
    ]
    causal = AttentionMetadata.build([0], [3], [[0]], 8).parts[0]
    assert causal.causal and causal.query_positions is None
    assert causal.mask()[0, 0].tolist() == [[True, False, False], [True, True, False], [True] * 3]
    decode = AttentionMetadata.build([4, 1], [1, 1], [[0], [1]], 8).parts[0]
    assert decode.mask()[:, 0, 0].tolist() == [[True] * 5, [True, True, False, False, False]]
