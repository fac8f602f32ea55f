"""Mixtral (`MixtralForCausalLM`): GQA without q/k norm, softmax top-k renormalised, every layer
MoE with experts of size `intermediate_size`.

Checkpoints name the MoE block `block_sparse_moe` and the expert projections w1 (gate), w3 (up),
w2 (down): `model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight`.
Legend: T tokens, H hidden. KV cache entry per token and layer: [2, Hkv, D] (key, value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from workers.models.decoder import DecoderLayer, DecoderLM
from workers.models.qwen3_moe import GQAttention, SoftmaxMoE, _reject_sliding_window
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


class MixtralForCausalLM(DecoderLM):
    def __init__(self, config, owned_experts: Sequence[int] | None = None) -> None:
        super().__init__(config, owned_experts)
        _reject_sliding_window(config)
        owned = self.owned(config.num_local_experts)
        layers = [
            DecoderLayer(
                config,
                GQAttention(config, qk_norm=False),
                SoftmaxMoE(
                    config,
                    config.num_local_experts,
                    owned,
                    renormalize=True,
                    experts_cls=MixtralExperts,
                ),
                ffn_name="block_sparse_moe",
            )
            for _ in range(config.num_hidden_layers)
        ]
        attn = layers[0].self_attn
        self.build(layers, (2, attn.num_kv_heads, attn.head_dim), attn.head_dim)
