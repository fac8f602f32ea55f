"""Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA with per-head q/k RMSNorm, softmax top-k routing.

Legend: T tokens, H hidden, Hq query heads, Hkv KV heads, D head dim, E experts, K top-k.
KV cache entry per token and layer: [2, Hkv, D] (key, value).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workers import kernels
from workers.models.attention import AttentionMetadata, KVLayout, paged_attention, write_kv
from workers.models.decoder import DecoderLayer, DecoderLM
from workers.models.layers import MLP, Linear, RMSNorm, apply_rotary
from workers.moe.experts import RoutedExperts
from workers.moe.gating import softmax_topk

__all__ = ["GQAttention", "Qwen3MoeForCausalLM", "SoftmaxMoE"]


class GQAttention(nn.Module):
    """Grouped-query attention over the paged cache; optional per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, config, qk_norm: bool) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.num_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.scale = self.head_dim**-0.5
        hkv, d = self.num_kv_heads, self.head_dim
        self.kv_layout = KVLayout(hkv, 0, d, hkv * d, d, d)  # cache row [2, Hkv, D]

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        if t == 0:  # empty lockstep step: nothing to attend
            return torch.zeros_like(x)
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        qn, kn = self.q_norm, self.k_norm
        norms = (qn.weight, kn.weight) if qn is not None and kn is not None else None
        eps = qn.eps if qn is not None else 0.0
        if not kernels.rope_qk(q, k, v, cos_sin, norms, eps, cache, meta.slot_mapping):
            if qn is not None and kn is not None:
                q, k = qn(q), kn(k)
            q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
            write_kv(cache, meta, torch.stack((k, v), dim=1))  # cache [S, 2, Hkv, D]
        out = paged_attention(  # contexts [b, L, 2, Hkv, D]: K and V
            q, cache, meta, lambda ctx: (ctx[:, :, 0], ctx[:, :, 1]), self.scale, self.kv_layout
        )  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class SoftmaxMoE(nn.Module):
    """Softmax top-k routed experts (Qwen-MoE, Mixtral)."""

    def __init__(
        self,
        config,
        num_experts: int,
        owned: Sequence[int],
        renormalize: bool,
        experts_cls: type[RoutedExperts] = RoutedExperts,  # sets the checkpoint names
    ) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = renormalize
        self.gate = Linear(config.hidden_size, num_experts, bias=False)
        self.experts = experts_cls(
            num_experts,
            owned,
            config.hidden_size,
            config.moe_intermediate_size
            if hasattr(config, "moe_intermediate_size")
            else config.intermediate_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = softmax_topk(self.gate(x), self.top_k, self.renormalize)  # [T, K]
        return self.experts(x, ids, weights.to(x.dtype))


class Qwen3MoeForCausalLM(DecoderLM):
    def __init__(self, config, owned_experts: Sequence[int] | None = None) -> None:
        super().__init__(config, owned_experts)
        _reject_sliding_window(config)
        owned = self.owned(config.num_experts)
        layers = []
        for i in range(config.num_hidden_layers):
            sparse = (
                i not in (config.mlp_only_layers or [])
                and config.num_experts > 0
                and ((i + 1) % config.decoder_sparse_step == 0)
            )
            mlp = (
                SoftmaxMoE(config, config.num_experts, owned, bool(config.norm_topk_prob))
                if sparse
                else MLP(config.hidden_size, config.intermediate_size)
            )
            layers.append(DecoderLayer(config, GQAttention(config, qk_norm=True), mlp))
        attn = layers[0].self_attn
        self.build(layers, (2, attn.num_kv_heads, attn.head_dim), attn.head_dim)


def _reject_sliding_window(config) -> None:
    window = getattr(config, "sliding_window", None)
    used = getattr(config, "use_sliding_window", window is not None)
    if window is not None and used and window < config.max_position_embeddings:
        raise NotImplementedError(
            f"sliding_window={window} is not supported yet; set sliding_window to null in "
            "config.json (full attention) to serve this checkpoint"
        )
