"""`read_config` (config.json without transformers) against `AutoConfig.from_pretrained` for
every field the model code, the loader and the engine read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoConfig

from tests.conftest import CHECKPOINTS
from workers.models.config import FAMILY_DEFAULTS, read_config

ROOT = Path(__file__).resolve().parents[2]
ARCH = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def fields_read() -> set[str]:
    """Every `config.<field>` and `getattr(config, "<field>"` in workers/ and cluster/."""
    names: set[str] = set()
    for path in [*ROOT.glob("workers/**/*.py"), *ROOT.glob("cluster/*.py")]:
        text = path.read_text()
        names |= set(re.findall(r"\b(?:config|model_cfg)\.([a-z][a-z_]+)\b", text))
        names |= set(re.findall(r"getattr\((?:config|model_cfg), \"([a-z_]+)\"", text))
    engine_fields = {"block_size", "num_kv_blocks", "kv_cache_bytes", "max_model_len", "seed"}
    engine_fields |= {"prefix_caching", "scheduler", "max_num_seqs", "max_num_batched_tokens"}
    engine_fields |= {"max_prefill_chunk", "max_waiting", "json"}
    return names - engine_fields


FIELDS = sorted(fields_read())


def assert_same(path: Path) -> None:
    ours, theirs = read_config(path), AutoConfig.from_pretrained(path)
    for name in FIELDS:
        assert getattr(ours, name, None) == getattr(theirs, name, None), name


def test_the_fields_cover_the_model_code():
    for name in ("hidden_size", "rope_parameters", "n_routed_experts", "num_experts", "head_dim"):
        assert name in FIELDS
    assert set(FAMILY_DEFAULTS) == set(ARCH)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tiny_checkpoints(name, tiny_checkpoint):
    assert_same(tiny_checkpoint(name))


def _write(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


YARN = {
    "type": "yarn",
    "factor": 40,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
}


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("deepseek_v3", {}),
        ("qwen3_moe", {}),
        ("mixtral", {}),
        # DeepSeek-V3's own config.json: legacy rope_scaling and rope_theta at the top level
        ("deepseek_v3", {"rope_scaling": YARN, "rope_theta": 1e4, "max_position_embeddings": 8192}),
        ("deepseek_v3", {"rope_scaling": {k: v for k, v in YARN.items() if "original" not in k}}),
        ("deepseek_v3", {"num_key_value_heads": None, "q_lora_rank": None, "n_group": None}),
        ("deepseek_v3", {"num_local_experts": 32}),
        ("qwen3_moe", {"num_experts": 16, "rope_theta": 1000000.0, "head_dim": 128}),
        ("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        ("mixtral", {"rope_theta": 500000.0, "num_local_experts": 4, "sliding_window": 4096}),
        ("mixtral", {"num_experts": 6}),
        ("qwen3_moe", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    ],
)
def test_defaults_aliases_and_legacy_rope(family, extra, tmp_path):
    assert_same(_write(tmp_path, {"architectures": [ARCH[family]], "model_type": family, **extra}))


def test_unknown_family_is_read_as_is(tmp_path):
    config = read_config(_write(tmp_path, {"architectures": ["LlamaForCausalLM"], "x": 1}))
    assert config.x == 1 and config.architectures == ["LlamaForCausalLM"]
