"""Build an engine from an HF checkpoint directory: model (owned experts only), tokenizer, EOS."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from workers.engine.engine import Engine, EngineConfig

__all__ = ["DTYPES", "build_engine", "engine_tokenizer", "eos_token_ids", "load_tokenizer"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, or None when it ships no tokenizer files (token-id input)."""
    path = Path(model_dir)
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def engine_tokenizer(model_dir: str | Path):
    """What an engine needs of the tokenizer: tokenizer.json alone where transformers would load
    it unchanged (workers/engine/tokenizer.py; no transformers import), else load_tokenizer."""
    from workers.engine.tokenizer import TokenizerJson, plain_tokenizer_json

    if plain_tokenizer_json(model_dir):
        return TokenizerJson(model_dir)
    return load_tokenizer(model_dir)


def eos_token_ids(model_dir: str | Path, config, tokenizer) -> set[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    ids: set[int] = set()
    gen = Path(model_dir) / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id")] if gen.exists() else []
    sources += [getattr(config, "eos_token_id", None)]
    sources += [getattr(tokenizer, "eos_token_id", None)] if tokenizer is not None else []
    for src in sources:
        if src is None:
            continue
        ids.update(src if isinstance(src, list) else [src])
        break
    return {int(i) for i in ids}


def build_engine(
    model_dir: str | Path,
    *,
    dtype: str = "float32",
    owned_experts: Sequence[int] | None = None,
    config: EngineConfig | None = None,
    device: str = "cpu",
    progress: bool | None = None,
    shard=None,
) -> Engine:
    from workers.loader import load_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    model = load_model(
        model_dir,
        dtype=DTYPES[dtype],
        owned_experts=None if owned_experts is None else list(owned_experts),
        device=device,
        progress=progress,
        shard=shard,
    )
    tokenizer = engine_tokenizer(model_dir)
    return Engine(model, config, tokenizer, eos_token_ids(model_dir, model.config, tokenizer))
