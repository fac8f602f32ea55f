"""Model families, chosen by the checkpoint's `architectures` entry."""

from __future__ import annotations

import importlib

__all__ = ["SUPPORTED_ARCHITECTURES", "UnsupportedArchitectureError", "model_class"]

# architecture name in config.json -> (module, class)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "DeepseekV3ForCausalLM": ("workers.models.deepseek_v3", "DeepseekV3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("workers.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "MixtralForCausalLM": ("workers.models.mixtral", "MixtralForCausalLM"),
}


class UnsupportedArchitectureError(ValueError):
    pass


def model_class(config) -> type:
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            module, name = SUPPORTED_ARCHITECTURES[arch]
            return getattr(importlib.import_module(module), name)
    raise UnsupportedArchitectureError(
        f"config.json architectures={archs or '(missing)'} is not supported; supported "
        f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
