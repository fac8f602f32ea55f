"""A checkpoint's `config.json`, read without transformers.

Importing transformers costs a process ~1.1 s after torch (on the 2-core dev VM), more than a
small model's load; a serving rank or an offline run only needs the fields below. `read_config`
gives what `transformers.AutoConfig.from_pretrained(dir)` gives for those fields: the family's
defaults (a `save_pretrained` config.json holds only the values that differ from them), the
family's attribute aliases (`num_experts` is Qwen3's and Mixtral's `num_local_experts`,
`num_local_experts` is DeepSeek-V3's `n_routed_experts`) and RoPE parameters standardized as
transformers 5 does (a legacy `rope_scaling` + top-level `rope_theta` become one
`rope_parameters` dict with `rope_type`, `rope_theta` and, for scaled types,
`original_max_position_embeddings`). `tests/models/test_model_config.py` compares every field
the model code reads with transformers' for the tiny checkpoints and for minimal and legacy
configs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["FAMILY_DEFAULTS", "ModelConfig", "read_config"]

# transformers 5's defaults for the fields this project reads, per model_type
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "rope_interleave": True,
        "attention_bias": False,
    },
    "qwen3_moe": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 768,
        "num_experts_per_tok": 8,
        "num_local_experts": 128,
        "norm_topk_prob": False,
        "mlp_only_layers": [],
        "eos_token_id": None,
    },
    "mixtral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": None,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "sliding_window": None,
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
    },
}
# per model_type: another name -> the attribute it stands for
_ALIASES: dict[str, dict[str, str]] = {
    "deepseek_v3": {"num_local_experts": "n_routed_experts"},
    "qwen3_moe": {"num_experts": "num_local_experts"},
    "mixtral": {"num_experts": "num_local_experts"},
}
_DEFAULT_THETA = {"mixtral": 1_000_000.0}  # others: 10,000
_SCALED_ROPE = ("llama3", "yarn", "longrope")  # types that carry the pretraining length


class ModelConfig(SimpleNamespace):
    """config.json's fields as attributes (absent ones: use getattr with a default)."""


def read_config(model_dir: str | Path) -> ModelConfig:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    model_type = str(raw.get("model_type", ""))
    fields = copy.deepcopy(FAMILY_DEFAULTS.get(model_type, {}))
    aliases = _ALIASES.get(model_type, {})
    for key, value in raw.items():
        fields[aliases.get(key, key)] = value
    if "num_attention_heads" in fields and fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if model_type == "deepseek_v3":
        fields["head_dim"] = fields["qk_rope_head_dim"]
        fields["qk_head_dim"] = fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"]
    if model_type in FAMILY_DEFAULTS:
        fields["rope_parameters"] = _rope_parameters(fields, _DEFAULT_THETA.get(model_type, 1e4))
        fields.pop("rope_scaling", None)
        fields.pop("rope_theta", None)
    for alias, name in aliases.items():
        if name in fields:
            fields[alias] = fields[name]
    return ModelConfig(**fields)


def _rope_parameters(fields: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """One flat `rope_parameters` dict, as transformers' `convert_rope_params_to_dict` and
    `standardize_rope_params` make it (nested per-layer-type parameters are not used by the
    families here)."""
    params = dict(fields.get("rope_scaling") or fields.get("rope_parameters") or {})
    params.setdefault("rope_theta", fields.get("rope_theta", default_theta))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in _SCALED_ROPE:
        if "original_max_position_embeddings" in fields:
            params["original_max_position_embeddings"] = fields["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", fields["max_position_embeddings"])
    return params
