"""Mixtral (`MixtralForCausalLM`): GQA without q/k norm, softmax top-k renormalised, every layer
MoE with experts of size `intermediate_size`.

Checkpoints name the MoE block `block_sparse_moe` and the expert projections w1 (gate), w3 (up),
w2 (down): `model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight`.
Legend: T tokens, H hidden. KV cache entry per token and layer: [2, Hkv, D] (key, value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from workers.models.base import CausalLM
from workers.models.layers import RMSNorm, rotary_cos_sin
from workers.models.qwen3_moe import GQAttention, SoftmaxMoE, _Body, _reject_sliding_window
from workers.models.rope import rope_from_config
from workers.moe.experts import RoutedExperts

__all__ = ["MixtralForCausalLM"]

# our per-expert name (RoutedExperts) -> Mixtral checkpoint name
_RENAME = {
    ".gate_proj.weight": ".w1.weight",
    ".up_proj.weight": ".w3.weight",
    ".down_proj.weight": ".w2.weight",
}


def _mixtral_name(name: str) -> str:
    for ours, theirs in _RENAME.items():
        if name.endswith(ours):
            return name[: -len(ours)] + theirs
    return name


class MixtralExperts(RoutedExperts):
    """`RoutedExperts` under Mixtral's checkpoint names (w1/w3/w2)."""

    def checkpoint_names(self, prefix: str) -> dict[str, tuple[int, ...]]:
        return {_mixtral_name(n): s for n, s in super().checkpoint_names(prefix).items()}

    def load(self, prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
        # Fetch lazily: `tensors` may stream from disk, so ask only for what is copied.
        super().load(prefix, _Renamed(tensors))


class _Renamed(Mapping[str, torch.Tensor]):
    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[_mixtral_name(name)]

    def __iter__(self):  # pragma: no cover - RoutedExperts.load only indexes
        return iter(self.tensors)

    def __len__(self) -> int:  # pragma: no cover
        return len(self.tensors)


class _Layer(nn.Module):
    def __init__(self, config, owned: Sequence[int]) -> None:
        super().__init__()
        self.self_attn = GQAttention(config, qk_norm=False)
        self.block_sparse_moe = SoftmaxMoE(
            config, config.num_local_experts, owned, renormalize=True, experts_cls=MixtralExperts
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta, cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralForCausalLM(CausalLM):
    def __init__(self, config, owned_experts: Sequence[int] | None = None) -> None:
        super().__init__(config, owned_experts)
        _reject_sliding_window(config)
        owned = self.owned(config.num_local_experts)
        layers = [_Layer(config, owned) for _ in range(config.num_hidden_layers)]
        self.model = _Body(config, list(layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        attn = layers[0].self_attn
        self.num_layers = config.num_hidden_layers
        self.vocab_size = config.vocab_size
        self.kv_token_shape = (2, attn.num_kv_heads, attn.head_dim)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.rope = rope_from_config(config, attn.head_dim)

    def forward(self, input_ids, meta, kv_cache):
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos_sin = rotary_cos_sin(meta.positions, self.rope.inv_freq, self.rope.scaling, x.dtype)
        for layer, cache in zip(self.model.layers, kv_cache, strict=True):
            x = layer(x, cos_sin, meta, cache)
        return self.model.norm(x)
