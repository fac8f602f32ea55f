"""`RoutedExperts.forward`, padded-batch, per-expert-loop and fused C++ kernel paths, against a
per-token loop."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from workers import kernels
from workers.moe import experts as experts_mod
from workers.moe.experts import RoutedExperts

E, H, I = 8, 32, 16


def _experts(owned, dtype=torch.float32, seed=0) -> RoutedExperts:
    m = RoutedExperts(E, owned, H, I)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.w13.copy_(torch.randn(m.w13.shape, generator=gen) * 0.2)
        m.w2.copy_(torch.randn(m.w2.shape, generator=gen) * 0.2)
    m.use_kernel = False  # the torch paths; "kernel" in _run turns it on
    return m.to(dtype)


def _reference(m: RoutedExperts, x, topk_ids, topk_weights) -> torch.Tensor:
    """Per token, in float64: sum over its owned experts of weight * SwiGLU FFN."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    w13, w2 = m.w13.double(), m.w2.double()
    for t in range(x.shape[0]):
        for e, w in zip(topk_ids[t].tolist(), topk_weights[t].tolist(), strict=True):
            local = int(m.expert_map[e])
            if local < 0:
                continue
            h = w13[local] @ x[t].double()
            out[t] += w * (w2[local] @ (F.silu(h[:I]) * h[I:]))
    return out


def _routing(t: int, k: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(t)]).view(t, k)
    return ids, torch.rand(t, k, generator=gen)


def _run(m, x, ids, w, monkeypatch, path: str | None = None) -> torch.Tensor:
    """Forward, asserting which path ran (`path`) or forcing one (`force_` prefix); "kernel":
    the fused C++ kernel (built by `make install`); "grouped": torch._grouped_mm (chosen on CUDA
    in bf16, forced here: torch runs it on the CPU too)."""
    if path == "grouped":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("this torch has no _grouped_mm")
        m.use_grouped_mm = True
    if path == "kernel":
        if kernels.kernel("routed_ffn") is None:
            pytest.skip("the C++ kernels are not built here")
        m.use_kernel = True
    if path is not None and path.startswith("force_"):
        path = path.removeprefix("force_")
        monkeypatch.setattr(experts_mod, "_use_padded", lambda counts: path == "padded")
    ran: list[str] = []
    for name in ("_padded", "_looped", "_grouped"):
        orig = getattr(RoutedExperts, name)
        monkeypatch.setattr(
            RoutedExperts, name, lambda self, *a, _o=orig, _n=name: ran.append(_n) or _o(self, *a)
        )
    with torch.no_grad():
        y = m(x, ids, w)
    if path in ("padded", "looped"):
        assert ran == [f"_{path}"]
    if path == "grouped":
        assert ran == ["_grouped"] or x.shape[0] == 0 or not len(m.owned), ran
    if path == "kernel":
        assert ran == [] or x.shape[0] == 0 or not len(m.owned), ran
    assert y.shape == x.shape and y.dtype == x.dtype
    return y


@pytest.mark.parametrize(
    ("t", "path"),
    [(16, "padded"), (400, "looped"), (1, "looped"), (16, "force_looped"), (16, "kernel")]
    + [(400, "kernel"), (1, "kernel"), (1, "grouped"), (16, "grouped"), (400, "grouped")],
)
def test_random_routing_matches_reference(t, path, monkeypatch):
    m = _experts(range(E))
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(2))
    ids, w = _routing(t, 2)
    y = _run(m, x, ids, w, monkeypatch, path)
    torch.testing.assert_close(y.double(), _reference(m, x, ids, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["force_padded", "force_looped", None, "grouped"])
@pytest.mark.parametrize("t", [24, 300])
def test_experts_owned_elsewhere_contribute_nothing(t, path, monkeypatch):
    m = _experts([1, 4, 6])
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(3))
    ids, w = _routing(t, 3)
    y = _run(m, x, ids, w, monkeypatch, path)
    ref = _reference(m, x, ids, w)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    none_owned = ~torch.isin(ids, torch.tensor([1, 4, 6])).any(1)
    assert none_owned.any() and (y[none_owned] == 0).all()


@pytest.mark.parametrize("path", ["force_padded", "force_looped", None, "kernel", "grouped"])
def test_all_tokens_to_one_expert(path, monkeypatch):
    m = _experts(range(E))
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(4))
    ids, w = torch.full((64, 1), 5), torch.rand(64, 1)
    y = _run(m, x, ids, w, monkeypatch, path)
    torch.testing.assert_close(y.double(), _reference(m, x, ids, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", [None, "grouped"])
@pytest.mark.parametrize("owned", [range(E), []])
def test_no_tokens_or_no_owned_experts(owned, path, monkeypatch):
    m = _experts(owned)
    m.use_grouped_mm = path == "grouped"
    x0 = torch.randn(0, H)
    assert _run(
        m, x0, torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), monkeypatch
    ).shape == (0, H)
    x = torch.randn(5, H)
    ids, w = _routing(5, 2)
    y = _run(m, x, ids, w, monkeypatch)
    torch.testing.assert_close(y.double(), _reference(m, x, ids, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("t", "path"), [(16, "padded"), (400, "looped"), (400, "kernel"), (400, "grouped")]
)
def test_bf16(t, path, monkeypatch):
    m = _experts(range(E), torch.bfloat16)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(5)).bfloat16()
    ids, w = _routing(t, 2)
    y = _run(m, x, ids, w.bfloat16(), monkeypatch, path)
    ref = _reference(m, x, ids, w.bfloat16().float())
    torch.testing.assert_close(y.double(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


def test_kernels_are_built_where_a_compiler_is():
    """`make install` builds them; a broken build would silently fall back to torch."""
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ toolchain here: the torch paths run")
    assert kernels.kernel("routed_ffn") is not None, "run: python -m workers.kernels.build"


def test_grouped_mm_only_on_cuda_bf16_by_default(monkeypatch):
    m = _experts(range(E))
    assert not m._grouped_mm_on(torch.zeros(1, H))
    assert not m._grouped_mm_on(torch.zeros(1, H, dtype=torch.bfloat16))  # CPU: the C++ paths


def test_kernel_off_switch(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS", "0")
    assert kernels.kernel("routed_ffn") is None


def test_kernel_repacks_weights_changed_in_place(monkeypatch):
    """The packed copy the kernel reads follows w13/w2: a load or rebalance copy_ into them,
    or new Parameters (set_slots), is seen by the next forward."""
    m = _experts(list(range(E)))
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(4))
    ids, w = _routing(6, 2)
    _run(m, x, ids, w, monkeypatch, "kernel")
    assert m._packed is not None
    with torch.no_grad():
        m.w13.mul_(-1.5)  # in place, as load() and rebalance do
        m.w2.copy_(torch.randn(m.w2.shape, generator=torch.Generator().manual_seed(9)) * 0.2)
    y = _run(m, x, ids, w, monkeypatch, "kernel")
    torch.testing.assert_close(y.double(), _reference(m, x, ids, w), atol=1e-5, rtol=1e-5)
    m.w13 = torch.nn.Parameter(m.w13.detach() * 0.5)  # replaced, as set_slots does
    y = _run(m, x, ids, w, monkeypatch, "kernel")
    torch.testing.assert_close(y.double(), _reference(m, x, ids, w), atol=1e-5, rtol=1e-5)
