"""The pre-norm decoder skeleton the three families share: embed → layers → norm → lm_head.

Each family supplies its attention and feed-forward modules; attribute names follow the HF
checkpoint names (`self_attn`, `mlp` or Mixtral's `block_sparse_moe`, the two layer norms,
`model.embed_tokens`, `model.norm`, `lm_head`), so the checkpoint contract stays derived.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workers.models.attention import AttentionMetadata, sdpa_backends
from workers.models.base import CausalLM
from workers.models.layers import Linear, RMSNorm, RotaryTable
from workers.models.rope import rope_from_config

__all__ = ["DecoderLM", "DecoderLayer"]


class DecoderLayer(nn.Module):
    def __init__(self, config, attn: nn.Module, ffn: nn.Module, ffn_name: str = "mlp") -> None:
        super().__init__()
        self.self_attn = attn
        self.ffn_name = ffn_name
        self.add_module(ffn_name, ffn)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, meta, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta, cache)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, config, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderLM(CausalLM):
    """Families call `build(...)` at the end of their `__init__`."""

    def build(
        self,
        layers: Sequence[DecoderLayer],
        kv_token_shape: tuple[int, ...],
        rope_dim: int,
    ) -> None:
        config = self.config
        self.model = _Body(config, layers)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_layers = config.num_hidden_layers
        self.vocab_size = config.vocab_size
        self.kv_token_shape = kv_token_shape
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.rope = rope_from_config(config, rope_dim)
        self.rotary = RotaryTable(self.rope.inv_freq, self.rope.scaling)

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, H]
        cos_sin = self.rotary(meta.positions, x.dtype)  # [T, D] each
        with sdpa_backends(x.device):
            for layer, cache in zip(self.model.layers, kv_cache, strict=True):
                x = layer(x, cos_sin, meta, cache)
        return self.model.norm(x)
