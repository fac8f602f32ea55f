"""The engine's tokenizer without transformers where the checkpoint allows it.

An engine calls its tokenizer for three things only: `encode(text, add_special_tokens=False)`
(text prompts), `decode(ids, skip_special_tokens=True)` (streamed text) and `eos_token_id`.
For a checkpoint whose tokenizer transformers itself loads as a plain `tokenizer.json` backend
(`tokenizer_class` TokenizersBackend or PreTrainedTokenizerFast, no clean-up pass, no
pre-tokenizer override), those are the Rust `tokenizers` calls alone, so the rank or offline
process need not import transformers (~1.1 s after torch on the 2-core dev VM). Any other
tokenizer (a family's own class, SentencePiece, a chat template) loads through transformers, as
the Router's always does: it also renders chat templates. `tests/engine/test_tokenizer.py`
compares both on the same strings.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PLAIN_CLASSES", "TokenizerJson", "plain_tokenizer_json"]

PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# tokenizer_config.json keys with which transformers changes the backend or its output
_CHANGES_BACKEND = ("add_prefix_space", "legacy", "add_bos_token", "add_eos_token", "auto_map")


def plain_tokenizer_json(model_dir: str | Path) -> bool:
    """True when transformers would load `model_dir`'s tokenizer as tokenizer.json unchanged."""
    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() or not (path / "tokenizer_config.json").is_file():
        return False
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    return (
        cfg.get("tokenizer_class") in PLAIN_CLASSES
        and cfg.get("backend", "tokenizers") == "tokenizers"
        and not cfg.get("clean_up_tokenization_spaces", False)
        and not any(key in cfg for key in _CHANGES_BACKEND)
    )


class TokenizerJson:
    """tokenizer.json through the `tokenizers` library: the engine's three calls."""

    clean_up_tokenization_spaces = False  # plain_tokenizer_json admits no clean-up pass

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(model_dir)
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        eos = json.loads((path / "tokenizer_config.json").read_text()).get("eos_token")
        if isinstance(eos, dict):  # an AddedToken written out
            eos = eos.get("content")
        self.eos_token_id: int | None = self._tokenizer.token_to_id(eos) if eos else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
