"""Incremental detokenization for streaming: new text per new token, never a broken character.

Decodes a short window of recent tokens and emits only the text past what the window already
produced; a trailing U+FFFD means a multi-byte character is still incomplete, so it waits.
"""

from __future__ import annotations

__all__ = ["IncrementalDetokenizer"]

_WINDOW = 6  # tokens of left context re-decoded with each new token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_token_ids)
        self.read_offset = len(self.ids)  # ids before this are already emitted as text
        self.prefix_offset = max(0, self.read_offset - _WINDOW)

    def _decode(self, ids: list[int]) -> str:
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
