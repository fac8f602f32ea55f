"""Prompt checks shared by every front door (engine, offline driver, later the gRPC router)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workers.engine.params import InvalidRequestError

__all__ = ["PromptLimits", "encode_prompt"]


@dataclass(frozen=True)
class PromptLimits:
    vocab_size: int  # token ids must lie in [0, vocab_size)
    max_model_len: int  # prompt + generated tokens must stay below this
    max_prompt_tokens: int | None = None  # KV capacity of one rank, when known


def encode_prompt(
    tokenizer, limits: PromptLimits, prompt: str | None, prompt_token_ids: Sequence[int] | None
) -> list[int]:
    """The prompt as token ids, checked against the vocabulary and the context length.
    Raises InvalidRequestError naming the field and the fix."""
    if (prompt is None) == (prompt_token_ids is None):
        raise InvalidRequestError("prompt", "give exactly one of prompt or prompt_token_ids")
    if prompt is not None:
        if not prompt:
            raise InvalidRequestError("prompt", "is empty; give at least one character")
        if tokenizer is None:
            raise InvalidRequestError(
                "prompt", "this checkpoint has no tokenizer files; send prompt_token_ids"
            )
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        field_name = "prompt"
    else:
        ids = [int(t) for t in prompt_token_ids or ()]
        field_name = "prompt_token_ids"
    if not ids:
        raise InvalidRequestError(field_name, "is empty; give at least one token")
    for i, t in enumerate(ids):
        if not 0 <= t < limits.vocab_size:
            raise InvalidRequestError(
                "prompt_token_ids",
                f"token id {t} at index {i} is outside the vocabulary [0, {limits.vocab_size})",
            )
    if len(ids) >= limits.max_model_len:
        raise InvalidRequestError(
            field_name,
            f"{len(ids)} tokens leave no room to generate within the context length "
            f"{limits.max_model_len}; shorten the prompt",
        )
    if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise InvalidRequestError(
            field_name, f"{len(ids)} tokens do not fit in this rank's KV cache; shorten it"
        )
    return ids
