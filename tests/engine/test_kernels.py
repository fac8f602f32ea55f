"""The few-row linear and RMSNorm C++ kernels against ATen, and every kernel on the baseline
instruction set (`MOE_ISA=base`, in a subprocess: the set is chosen once per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from workers import kernels
from workers.models.layers import Linear, RMSNorm, apply_rotary, rotary_cos_sin

pytestmark = pytest.mark.skipif(
    kernels.kernel("linear") is None, reason="the C++ kernels are not built here"
)


@pytest.mark.parametrize("rows", [1, 2, 7, 32, 65, kernels.PACKED_ROWS])
@pytest.mark.parametrize("k,n", [(64, 48), (13, 5), (40, 100), (512, 2049)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_aten(rows, k, n, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    with torch.no_grad():
        got = kernels.linear(x, w, b, kernels.Panels())
    assert got is not None
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_linear_leaves_what_aten_does_better_to_aten():
    w = torch.randn(64, 64)
    panels = kernels.Panels()
    with torch.no_grad():
        assert kernels.linear(torch.randn(kernels.PACKED_ROWS + 1, 64), w, None, panels) is None
        assert kernels.linear(torch.randn(4, 64).double(), w.double(), None, panels) is None
    assert kernels.linear(torch.randn(4, 64), w, None, panels) is None  # autograd on


def test_linear_packed_copy_follows_the_weight():
    """The packed copy is remade when the weight is changed in place or replaced (a load, a
    rebalance), and reused while it is not."""
    m = Linear(64, 40)
    x = torch.randn(8, 64)
    with torch.no_grad():
        m(x)
        first = m._panels.of(m.weight)[0]
        m(x)
        assert m._panels.of(m.weight)[0] is first
        m.weight.mul_(2)
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), atol=1e-4, rtol=1e-5)
        m.weight = torch.nn.Parameter(torch.randn(40, 64))
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), atol=1e-4, rtol=1e-5)


def test_linear_module_keeps_leading_dims():
    m = Linear(16, 24)
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), atol=1e-5, rtol=1e-5)


def _rope_reference(q, k, v, cos, sin, norms, eps, cache, slots):
    """The torch path GQAttention takes without the kernel."""
    if norms is not None:  # RMSNorm as transformers computes it
        q, k = (
            w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
            for x, w in zip((q, k), norms, strict=True)
        )
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    cache = cache.clone().index_copy_(0, slots, torch.stack((k, v), dim=1))
    return q, k, cache


@pytest.mark.parametrize(
    "t,hq,hkv,d", [(1, 8, 4, 64), (64, 8, 4, 64), (150, 4, 2, 20), (3, 2, 1, 6)]
)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_qk_equals_the_torch_path(t, hq, hkv, d, qk_norm):
    gen = torch.Generator().manual_seed(t * 100 + d + qk_norm)
    q, k, v = (torch.randn(t, h, d, generator=gen) * 3 for h in (hq, hkv, hkv))
    positions = torch.randint(0, 4000, (t,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rotary_cos_sin(positions, inv_freq, 1.0, torch.float32)
    norms = (torch.randn(d, generator=gen), torch.randn(d, generator=gen)) if qk_norm else None
    cache = torch.randn(t + 7, 2, hkv, d, generator=gen)
    slots = torch.randperm(t + 7, generator=gen)[:t]
    want_q, want_k, want_cache = _rope_reference(q, k, v, cos, sin, norms, 1e-6, cache, slots)
    with torch.no_grad():
        assert kernels.rope_qk(q, k, v, (cos, sin), norms, 1e-6, cache, slots)
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, want_cache, atol=1e-5, rtol=1e-5)


def test_rope_qk_leaves_other_tensors_to_torch():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    cos_sin = (torch.randn(2, 8), torch.randn(2, 8))
    cache, slots = torch.zeros(4, 2, 2, 8), torch.tensor([0, 1])
    with torch.no_grad():
        assert not kernels.rope_qk(q.double(), k, v, cos_sin, None, 0.0, cache, slots)
        assert not kernels.rope_qk(q[:, ::2], k, v, cos_sin, None, 0.0, cache, slots)
        assert not kernels.rope_qk(q, k, v, cos_sin, None, 0.0, torch.zeros(4, 3, 2, 8), slots)
    assert not kernels.rope_qk(q, k, v, cos_sin, None, 0.0, cache, slots)  # autograd on
    assert cache.abs().sum() == 0


@pytest.mark.parametrize("t,e,k", [(0, 16, 2), (1, 8, 1), (64, 16, 2), (300, 128, 8)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_equals_torch(t, e, k, renormalize):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t + e + k)) * 4
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    want_w, want_ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    with torch.no_grad():
        got = kernels.softmax_topk(logits, k, renormalize)
    assert got is not None
    assert torch.equal(got[0], want_ids)
    torch.testing.assert_close(got[1], want_w, atol=1e-6, rtol=1e-5)


def test_softmax_topk_keeps_ids_in_range_for_degenerate_logits():
    logits = torch.tensor([[float("nan")] * 4, [float("inf"), 0, 0, float("-inf")], [0.0] * 4])
    with torch.no_grad():
        ids, _ = kernels.softmax_topk(logits, 2, True)
    assert ids.min() >= 0 and ids.max() < 4
    assert ids[2].tolist() == [0, 1]  # ties: lower expert first


@pytest.mark.parametrize("t,k", [(0, 2), (1, 1), (64, 2), (97, 4)])
def test_group_pairs_equals_the_torch_grouping(t, k):
    """Pairs grouped by local expert in (token, k) order, as RoutedExperts.compute's torch path
    groups them (a stable sort), with experts owned elsewhere (-1) left out."""
    gen = torch.Generator().manual_seed(t * 10 + k)
    e = 16
    ids = torch.argsort(torch.rand(t, e, generator=gen), dim=-1)[:, :k].contiguous()  # [T, K]
    weights = torch.rand(t, k, generator=gen)
    expert_map = torch.full((e,), -1, dtype=torch.int64)
    owned = torch.tensor([1, 4, 5, 9, 15])
    expert_map[owned] = torch.arange(len(owned))
    local, order = torch.sort(expert_map[ids].flatten(), stable=True)
    counts = torch.bincount(local + 1, minlength=len(owned) + 1)
    order = order[int(counts[0]) :]
    with torch.no_grad():
        got = kernels.group_pairs(ids, weights, expert_map, len(owned))
    assert got is not None
    assert torch.equal(got[0], order // k)
    assert torch.equal(got[1], weights.flatten()[order])
    assert got[2].tolist() == counts[1:].tolist()


def test_greedy_rows_equal_argmax_and_the_finite_check():
    logits = torch.randn(70, 4099, generator=torch.Generator().manual_seed(3))
    logits[3, 5] = float("nan")
    logits[4, 9] = float("inf")
    logits[5, 7] = float("-inf")
    logits[6] = 1.0  # a tie everywhere: the first index, as torch.argmax
    with torch.no_grad():
        got = kernels.greedy_rows(logits)
    assert got is not None
    ids, finite = got
    assert finite == torch.isfinite(logits).all(-1).tolist()
    want = torch.argmax(logits, -1).tolist()
    assert [i for i, f in zip(ids, finite, strict=True) if f] == [
        w for w, f in zip(want, finite, strict=True) if f
    ]
    assert ids[6] == 0


@pytest.mark.parametrize("shape", [(1, 8), (5, 13), (64, 512), (300, 3, 64)])
def test_rms_norm_equals_the_torch_formula(shape):
    gen = torch.Generator().manual_seed(len(shape) + shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
        x = torch.randn(*shape, generator=gen) * 3
        got = norm(x)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


PACKED_ROWS = """
import torch, torch.nn.functional as F
from workers import kernels
torch.manual_seed(0)
h, i, counts = 40, 24, list(range(1, 27))  # every tile split of 1-26 rows per expert
x = torch.randn(30, h)
tokens = torch.cat([torch.randperm(30)[:c] for c in counts])
weights = torch.rand(len(tokens))
w13, w2 = torch.randn(len(counts), 2 * i, h), torch.randn(len(counts), h, i)
packed = (kernels.pack_panels(w13), kernels.pack_panels(w2))
with torch.no_grad():
    got = kernels.routed_ffn(x, tokens, weights, counts, w13, w2, packed)
    ref, lo = torch.zeros_like(x), 0
    for e, c in enumerate(counts):
        rows = tokens[lo : lo + c]
        h13 = x[rows] @ w13[e].t()
        g = F.silu(h13[:, :i]) * h13[:, i:] * weights[lo : lo + c, None]
        ref.index_add_(0, rows, g @ w2[e].t())
        lo += c
torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
print(kernels.kernel("isa")())
"""


@pytest.mark.parametrize("isa", ["", "avx2", "base"])
def test_packed_experts_for_every_row_count(isa):
    """The packed few-row product cuts an expert's rows in tiles by the instruction set's
    register count (12 rows with AVX-512, 6 otherwise): every split of 1-26 rows is exact."""
    env = dict(os.environ, MOE_ISA=isa)
    out = subprocess.run(
        [sys.executable, "-c", PACKED_ROWS], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert not isa or out.stdout.strip() in (isa, "base"), out.stdout  # capped, never above


def test_the_kernels_name_their_instruction_set():
    isa = kernels.kernel("isa")
    assert isa is not None and isa() in ("avx512", "avx2", "base")


def test_fma_peak_counts_every_thread_at_the_instruction_sets_width():
    """The ceiling bench.long_prefill states: GFLOP/s of register-only multiply-adds, summed
    over the intra-op threads, in vectors of the set the kernels run with."""
    gflops, width = kernels.kernel("fma_peak")(1_000_000)
    assert width == {"avx512": 16, "avx2": 8, "base": 8}[kernels.kernel("isa")()]
    assert 0 < gflops < 1e5  # finite, positive; its size is the benchmark's business
    assert kernels.fma_peak(1_000_000) > 0


BASELINE = """
import torch, torch.nn.functional as F
from workers import kernels
assert kernels.kernel("isa")() == "base"
torch.manual_seed(0)
with torch.no_grad():
    x, w, b = torch.randn(9, 70), torch.randn(37, 70), torch.randn(37)
    rows = torch.randn(70, 70)  # a block of 64 rows and one of 6
    for a in (x, rows):
        got = kernels.linear(a, w, b, kernels.Panels())
        torch.testing.assert_close(got, F.linear(a, w, b), atol=1e-4, rtol=1e-5)
    g = torch.randn(70)
    ref = g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(kernels.rms_norm(x, g, 1e-6), ref, atol=1e-5, rtol=1e-5)
    tokens = torch.tensor([0, 3, 5, 1, 2, 8])
    weights = torch.rand(6)
    w13, w2 = torch.randn(2, 2 * 24, 70), torch.randn(2, 70, 24)
    got = kernels.routed_ffn(x, tokens, weights, [4, 2], w13, w2)
    ref = torch.zeros_like(x)
    for (lo, hi), e in (((0, 4), 0), ((4, 6), 1)):
        h = x[tokens[lo:hi]] @ w13[e].t()
        gated = F.silu(h[:, :24]) * h[:, 24:] * weights[lo:hi, None]
        ref.index_add_(0, tokens[lo:hi], gated @ w2[e].t())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    cache = torch.randn(40, 2, 2, 72)  # [S, 2, Hkv, D]: 4 query heads over 2 KV heads
    q, slots, lens = torch.randn(3, 4, 72), torch.randint(0, 40, (3, 11)), torch.tensor([1, 6, 11])
    attn = kernels.kernel("paged_decode_attention")
    got = attn(q, cache, slots, lens, 2, 0, 72, 144, 72, 72, 0.1)
    for s in range(3):
        ctx = cache[slots[s, : lens[s]]]  # [L, 2, Hkv, D]
        for h in range(4):
            p = (ctx[:, 0, h // 2] @ q[s, h] * 0.1).softmax(-1)
            torch.testing.assert_close(got[s, h], p @ ctx[:, 1, h // 2], atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(5, 4, 20), torch.randn(5, 2, 20), torch.randn(5, 2, 20)
    cos, sin = torch.randn(5, 20), torch.randn(5, 20)
    rot = [torch.cat((-x[..., 10:], x[..., :10]), -1) for x in (q, k)]
    want_q, want_k = (x * cos[:, None] + r * sin[:, None] for x, r in zip((q, k), rot))
    cache = torch.zeros(9, 2, 2, 20)
    assert kernels.rope_qk(q, k, v, (cos, sin), None, 0.0, cache, torch.tensor([8, 0, 3, 1, 2]))
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[8, 0], want_k[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[8, 1], v[0])
from workers.models.attention import AttentionMetadata
meta = AttentionMetadata.build([140], [20], [list(range(10))], 16)
q, kv = torch.randn(20, 4, 24), torch.randn(1, 160, 2, 24)
with torch.no_grad():
    got = kernels.prefill_attention(q, kv, kv[..., :16], meta.parts[0], 0.3)
mask = torch.arange(160)[None, :] <= torch.arange(140, 160)[:, None]
ref = F.scaled_dot_product_attention(
    q.transpose(0, 1), kv[0].transpose(0, 1).repeat_interleave(2, 0),
    kv[0, ..., :16].transpose(0, 1).repeat_interleave(2, 0), attn_mask=mask, scale=0.3
).transpose(0, 1)
torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
assert kernels.kernel("fma_peak")(10_000)[0] > 0
print("ok")
"""


def test_every_kernel_on_the_baseline_instruction_set():
    env = dict(os.environ, MOE_ISA="base")
    out = subprocess.run(
        [sys.executable, "-c", BASELINE], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_older_build_can_be_named_and_the_build_ignores_it(monkeypatch):
    current = kernels.build_dir()
    monkeypatch.setenv("MOE_KERNELS_BUILD", "0123456789abcdef")
    assert kernels.build_dir().name == "0123456789abcdef"
    assert kernels.build_dir(pinned=False) == current
