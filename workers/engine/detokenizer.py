"""Incremental detokenization for streaming: new text per new token, never a broken character.

Decodes a short window of recent tokens and emits only the text past what the window already
produced; a trailing U+FFFD means a multi-byte character is still incomplete, so it waits.
"""

from __future__ import annotations

__all__ = ["IncrementalDetokenizer"]

_WINDOW = 6  # tokens of left context re-decoded with each new token


def _fast_decode(tokenizer):
    """The Rust `tokenizers.Tokenizer.decode` behind a transformers fast tokenizer when calling
    it gives the same text (no clean-up pass configured), else None. Two decodes per generated
    token through transformers' Python wrapper cost ~40 us each (argument conversion); the
    Rust call alone ~5 us."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode"):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend.decode


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_token_ids)
        self.read_offset = len(self.ids)  # ids before this are already emitted as text
        self.prefix_offset = max(0, self.read_offset - _WINDOW)
        self._fast = _fast_decode(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (may be "")."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]
