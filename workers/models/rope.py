"""Rotary frequency tables: default RoPE and YaRN (with DeepSeek's mscale), from a config's
`rope_parameters` (transformers normalises the legacy `rope_scaling` key into it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Rope", "rope_from_config", "yarn_mscale"]


@dataclass(frozen=True)
class Rope:
    inv_freq: torch.Tensor  # [D/2] fp32
    scaling: float  # multiplies cos and sin (YaRN attention factor; 1.0 for default RoPE)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in params:  # very old configs: theta at top level, no parameters dict
        params = {**params, "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return dict(params)


def rope_from_config(config, dim: int) -> Rope:
    params = rope_params(config)
    base = float(params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "default":
        return Rope(1.0 / (base**exponents), 1.0)
    if kind != "yarn":
        raise NotImplementedError(
            f"rope_parameters.rope_type={kind!r} is not supported; supported: default, yarn"
        )
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or config.max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base**exponents
    extrapolation = 1 - ramp  # share of the unscaled frequency per dimension
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return Rope(inv_freq, float(attention_factor))
