"""Shared fixtures: tiny checkpoints are written once per test session and reused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.tiny import make_tiny

YARN = {
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    }
}

# name -> (arch, config overrides): every architecture and the DeepSeek variants the issue names
CHECKPOINTS: dict[str, tuple[str, dict | None]] = {
    "qwen3_moe": ("qwen3_moe", None),
    "mixtral": ("mixtral", None),
    "deepseek_v3": ("deepseek_v3", None),  # with q_lora_rank
    "deepseek_v3_no_qlora": ("deepseek_v3", {"q_lora_rank": None}),
    "deepseek_v3_yarn": ("deepseek_v3", YARN),
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, overrides = CHECKPOINTS[name]
            out = tmp_path_factory.mktemp(name)
            make_tiny(arch, out, seed=0, overrides=overrides)
            made[name] = out
        return made[name]

    return get


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
