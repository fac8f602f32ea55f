"""DeepSeek-V3/R1 (`DeepseekV3ForCausalLM`): multi-head latent attention (MLA) + DeepSeekMoE.

Legend: T tokens, H hidden, N heads, C kv_lora_rank (latent), R qk_rope_head_dim,
Dn qk_nope_head_dim, Dv v_head_dim, B sequences, L context, S cache slots, E experts, K top-k.
KV cache entry per token and layer: [C + R], the compressed latent (after kv_a_layernorm) then the
roped key shared by all heads. Attention runs in latent space (kv_b_proj absorbed into the
query and the output), so the cached context is never expanded per head: fp32 results match
transformers' expanded form to rounding (the parity tests hold them to it).
Multi-token-prediction layers (`num_nextn_predict_layers`, stored as layer `num_hidden_layers`)
are not built, so `checkpoint_tensors()` never asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.attention import AttentionMetadata, KVLayout, paged_attention, write_kv
from workers.models.decoder import DecoderLayer, DecoderLM
from workers.models.layers import (
    MLP,
    Linear,
    RMSNorm,
    apply_rotary,
    apply_rotary_interleaved,
)
from workers.models.rope import rope_params, yarn_mscale
from workers.moe.experts import RoutedExperts
from workers.moe.gating import grouped_sigmoid_topk

__all__ = ["DeepseekMoE", "DeepseekV3ForCausalLM", "MLAttention"]


def softmax_scale(config, qk_head_dim: int) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN with `mscale_all_dim` (transformers'
    `yarn_apply_mscale`): the cos/sin carry the other part of YaRN's attention factor."""
    scale = qk_head_dim**-0.5
    params = rope_params(config)
    kind = params.get("rope_type", params.get("type")) or "default"
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if kind != "default" and mscale_all_dim:
        factor = params.get("factor") or (
            config.max_position_embeddings / params["original_max_position_embeddings"]
        )
        scale *= yarn_mscale(factor, mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    """Multi-head latent attention over a paged cache of compressed latents."""

    def __init__(self, config) -> None:
        super().__init__()
        h, n = config.hidden_size, config.num_attention_heads
        self.num_heads = n
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        bias = bool(getattr(config, "attention_bias", False))
        # The latent norms use RMSNorm's default eps (1e-6), not rms_norm_eps, like transformers.
        if self.q_lora_rank is None:
            self.q_proj = Linear(h, n * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, n * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(self.kv_lora_rank, n * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(n * self.v_dim, h, bias=bias)
        interleave = bool(getattr(config, "rope_interleave", True))
        self.rotary: Callable = apply_rotary_interleaved if interleave else apply_rotary
        self.scale = softmax_scale(config, qk_dim)
        self.kv_layout = KVLayout(1, 0, 0, 0, 0, self.kv_lora_rank)  # row [C + R]; v = [:C]

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: torch.Tensor,
    ) -> torch.Tensor:
        t, n, c = x.shape[0], self.num_heads, self.kv_lora_rank
        if t == 0:  # empty lockstep step: nothing to attend
            return torch.zeros_like(x)
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(t, n, qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([c, self.rope_dim], dim=-1)
        k_rope = self.rotary(k_rope[:, None], *cos_sin)[:, 0]  # [T, R]
        write_kv(cache, meta, torch.cat((self.kv_a_layernorm(latent), k_rope), dim=-1))  # [S, C+R]
        q_rope = self.rotary(q_rope, *cos_sin)
        if not any(part.decode for part in meta.parts):
            return self.o_proj(self._expanded(q_nope, q_rope, cache, meta).reshape(t, -1))
        # Weight absorption: q_nope . (W_uk c) = (q_nope W_uk) . c and sum_l a_l W_uv c_l =
        # W_uv sum_l a_l c_l, so attention runs in latent space and the context is never expanded.
        w_uk, w_uv = self.kv_b_proj.weight.view(n, -1, c).split([self.nope_dim, self.v_dim], 1)
        q_latent = torch.einsum("tnd,ndc->tnc", q_nope, w_uk)  # [T, N, C]
        q = torch.cat((q_latent, q_rope), dim=-1)  # [T, N, C + R]
        out = paged_attention(  # contexts [b, L, C + R]: one KV head shared by all heads
            q,
            cache,
            meta,
            lambda ctx: (ctx[:, :, None], ctx[:, :, None, :c]),
            self.scale,
            self.kv_layout,
        )  # [T, N, C]
        out = torch.einsum("tnc,nvc->tnv", out, w_uv)  # [T, N, Dv]
        return self.o_proj(out.reshape(t, -1))

    def _expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, meta
    ) -> torch.Tensor:
        """Prompt chunks only: attention in the expanded form transformers uses, each context's
        latents turned into per-head keys and values by kv_b_proj. For long queries it costs
        less than the absorbed form (q.k over Dn + R = 96 dims and values of Dv = 64 per head
        on the bench shapes, against C + R = 160 and C = 128), as vLLM does for prefill.
        q_nope [T, N, Dn], q_rope [T, N, R] -> [T, N, Dv]."""
        n, c, dn = self.num_heads, self.kv_lora_rank, self.nope_dim

        def kv(ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # ctx [b, L, C + R]
            b, length = ctx.shape[:2]
            kvx = self.kv_b_proj(ctx[..., :c]).view(b, length, n, dn + self.v_dim)
            k_nope, v = kvx.split([dn, self.v_dim], dim=-1)
            k_rope = ctx[..., None, c:].expand(b, length, n, self.rope_dim)
            return torch.cat((k_nope, k_rope), dim=-1), v  # [b, L, N, Dn + R], [b, L, N, Dv]

        q = torch.cat((q_nope, q_rope), dim=-1)  # [T, N, Dn + R]
        return paged_attention(q, cache, meta, kv, self.scale)


class _Router(nn.Module):
    """Router weight [E, H] and the fp32 selection bias `e_score_correction_bias` [E].

    The bias is a parameter (so it is part of the derived checkpoint contract) that stays fp32
    whatever dtype the model is cast to (transformers keeps it fp32 too): bf16 keeps ~3
    significant digits, coarser than the gaps between the biased scores it ranks, so rounding it
    would change which experts are selected. `_apply` backs `.to()`, `.half()`, `.cuda()`...:
    it may move the bias to another device, but when it changed the dtype we put the original
    fp32 values back (a buffer would be cast the same way, and is not a checkpoint parameter).
    """

    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        bias = torch.zeros(num_experts, dtype=torch.float32)
        self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)

    def _apply(self, fn, recurse: bool = True):
        before = self.e_score_correction_bias.data
        super()._apply(fn, recurse)
        after = self.e_score_correction_bias.data
        if after.dtype != torch.float32:
            self.e_score_correction_bias.data = before.to(after.device)
        return self


class DeepseekMoE(nn.Module):
    """Grouped sigmoid top-k routed experts (this rank's share) plus always-on shared experts."""

    def __init__(self, config, owned: Sequence[int]) -> None:
        super().__init__()
        h, num_experts = config.hidden_size, config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.num_groups = config.n_group or 1
        self.topk_groups = config.topk_group or 1
        self.renormalize = bool(config.norm_topk_prob)
        self.scaling = float(config.routed_scaling_factor)
        self.gate = _Router(h, num_experts)
        self.experts = RoutedExperts(num_experts, owned, h, config.moe_intermediate_size)
        shared = config.n_shared_experts or 0
        self.shared_experts = MLP(h, config.moe_intermediate_size * shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate.weight.float())  # [T, E] fp32 like transformers
        ids, weights = grouped_sigmoid_topk(
            logits,
            self.gate.e_score_correction_bias,
            self.top_k,
            self.num_groups,
            self.topk_groups,
            self.renormalize,
            self.scaling,
        )  # [T, K]
        shared = self.shared_experts
        # the shared experts run while the routed results travel back (expert parallelism)
        return self.experts(x, ids, weights, overlap=None if shared is None else lambda: shared(x))


class DeepseekV3ForCausalLM(DecoderLM):
    def __init__(self, config, owned_experts: Sequence[int] | None = None) -> None:
        super().__init__(config, owned_experts)
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act={act!r} is not supported; only 'silu' is")
        owned = self.owned(config.n_routed_experts)
        dense = config.first_k_dense_replace or 0
        layers = [
            DecoderLayer(
                config,
                MLAttention(config),
                DeepseekMoE(config, owned)
                if i >= dense
                else MLP(config.hidden_size, config.intermediate_size),
            )
            for i in range(config.num_hidden_layers)
        ]
        kv_token_shape = (config.kv_lora_rank + config.qk_rope_head_dim,)
        self.build(layers, kv_token_shape, config.qk_rope_head_dim)
