"""Layers shared by the model families: RMSNorm, the SwiGLU MLP, rotary embeddings.

Numerics follow transformers (the correctness oracle): RMSNorm normalises in fp32 and casts back
before the weight; rotary cos/sin are computed in fp32 from `positions * inv_freq`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import kernels

__all__ = [
    "MLP",
    "Linear",
    "RMSNorm",
    "RotaryTable",
    "apply_rotary",
    "apply_rotary_interleaved",
    "rotary_cos_sin",
]


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose CPU fp32 forward takes the C++
    packed-panel product up to kernels.PACKED_ROWS rows (decode-step projections, the LM head,
    short prefill chunks), where it beats ATen's sgemm; it keeps the packed copy of its weight
    (kernels.Panels, made on the first such call)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._panels = kernels.Panels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight, self.bias, self._panels)
        return F.linear(x, self.weight, self.bias) if y is None else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.rms_norm(x, self.weight, self.eps)  # fp32 on the CPU: one C++ pass
        if y is not None:
            return y
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward; parameter names match HF checkpoints."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, D] with D = 2 * len(inv_freq) (halves repeated)."""
    freqs = positions[:, None].float() * inv_freq.float()[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


class RotaryTable:
    """rotary_cos_sin's rows for positions [0, n), computed once and grown (doubled) when a
    step reaches past them: a step on the CPU then indexes its positions' rows (two
    index_selects) instead of recomputing them (six ops)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float) -> None:
        self.inv_freq, self.scaling = inv_freq, scaling
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU rows
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        """inv_freq on `device`, copied there once."""
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        return self._inv_freq_on[device]

    def __call__(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, D] (as rotary_cos_sin)."""
        if positions.numel() == 0 or positions.device.type != "cpu":
            # on an accelerator, reading the largest position back would sync the device every
            # step; computing the rows there is a few small kernels
            return rotary_cos_sin(positions, self._inv_freq(positions.device), self.scaling, dtype)
        cos, sin = self._tables.get(dtype, (None, None))
        need = int(positions.max()) + 1
        if cos is None or sin is None or cos.shape[0] < need:
            n = max(need, 2 * (0 if cos is None else cos.shape[0]), 256)
            every = torch.arange(n, device=positions.device)
            cos, sin = rotary_cos_sin(every, self._inv_freq(positions.device), self.scaling, dtype)
            self._tables[dtype] = (cos, sin)
        return cos.index_select(0, positions), sin.index_select(0, positions)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotary (halves rotated). x [T, Hn, D], cos/sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek interleaved rotary: pairs (x0, x1), (x2, x3)... rotate together; the output is
    laid out de-interleaved ([evens, odds]) exactly as transformers does. x [T, Hn, D]."""
    half = cos.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
