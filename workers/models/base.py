"""What every model family provides to the engine and the loader.

A model is built from a transformers config plus the routed experts this rank owns, is filled
from checkpoint tensors by name, and runs one engine step over a flat batch of new tokens:

    hidden = model(input_ids [T], meta, kv_cache)  # kv_cache: per layer [S, *kv_token_shape]
    logits = model.compute_logits(hidden[rows])  # [N, V] fp32

Parameter names are the HF checkpoint names, except routed experts (stacked per rank, see
`workers.moe.experts.RoutedExperts`), so `checkpoint_tensors()` can be derived from the module tree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from workers.models.attention import AttentionMetadata
from workers.moe.experts import RoutedExperts
from workers.moe.load_stats import ExpertLoad
from workers.moe.placement import Placement

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """Base class of the model families. Subclasses set the attributes below in `__init__`."""

    num_layers: int
    vocab_size: int
    kv_token_shape: tuple[int, ...]  # one layer's cache entry for one token
    tie_word_embeddings: bool = False
    expert_load: ExpertLoad | None = None  # set by track_expert_load; the engine steps it

    def __init__(self, config, owned_experts: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.owned_experts = owned_experts

    def forward(  # pragma: no cover - abstract
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in fp32."""
        lm_head: nn.Linear = self.lm_head  # type: ignore[assignment]
        return lm_head(hidden).float()

    def owned(self, num_experts: int) -> list[int]:
        return list(range(num_experts)) if self.owned_experts is None else list(self.owned_experts)

    def set_placement(self, placement: Placement, rank: int) -> None:
        """Hold `rank`'s physical expert slots of `placement` in every MoE layer (pre-load)."""
        for module in self.modules():
            if isinstance(module, RoutedExperts):
                module.reshard(placement, rank)

    def moe_layers(self) -> list[RoutedExperts]:
        """The routed experts of every MoE layer, in forward order (index = `layer_index`)."""
        return [m for m in self.modules() if isinstance(m, RoutedExperts)]

    def track_expert_load(self, window: int) -> ExpertLoad:
        """Count every MoE layer's logical top-k picks of this rank's own tokens over the last
        `window` engine steps (the engine opens one load step per forward). Returns the
        model-wide [layers, logical experts] counter, also kept as `self.expert_load`."""
        layers = self.moe_layers()
        if not layers:
            raise ValueError(f"{type(self).__name__} has no MoE layer: no expert load to track")
        device = layers[0].w13.device
        load = ExpertLoad(len(layers), layers[0].num_logical, window, device=device)
        for index, module in enumerate(layers):
            module.layer_index = index
            module.expert_load = load
        self.expert_load = load
        return load

    def set_dispatcher(self, dispatcher) -> None:
        """Route every MoE layer's tokens through `dispatcher` (expert parallelism); None: local."""
        for index, module in enumerate(m for m in self.modules() if isinstance(m, RoutedExperts)):
            module.dispatcher = dispatcher
            module.layer_index = index

    # --- checkpoint contract -------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor this rank needs, with its expected shape."""
        names: dict[str, tuple[int, ...]] = {}
        for prefix, module in self.named_modules():
            if isinstance(module, RoutedExperts):
                names.update(module.checkpoint_names(prefix))
                continue
            if _inside_experts(self, prefix):
                continue
            for pname, p in module.named_parameters(recurse=False):
                names[f"{prefix}.{pname}" if prefix else pname] = tuple(p.shape)
        if self.tie_word_embeddings:
            names.pop("lm_head.weight", None)
        return names

    @torch.no_grad()
    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors (names from `checkpoint_tensors`) into the parameters."""
        params = dict(self.named_parameters())
        for prefix, module in self.named_modules():
            if isinstance(module, RoutedExperts):
                module.load(prefix, tensors)
        for name in self.checkpoint_tensors():
            if name in params:
                params[name].copy_(tensors[name])
        if self.tie_word_embeddings:
            params["lm_head.weight"].copy_(tensors["model.embed_tokens.weight"])


def _inside_experts(model: nn.Module, prefix: str) -> bool:
    parts = prefix.split(".")
    for n in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:n])), RoutedExperts):
            return True
    return False
