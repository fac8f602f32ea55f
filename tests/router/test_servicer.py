"""`InferenceServicer`'s request parsing: where it runs (event loop or a worker thread)."""

from __future__ import annotations

import asyncio
import threading

from router.client import generate_request
from router.servicer import INLINE_PROMPT_IDS, InferenceServicer, ModelDescription, RouterSettings
from workers.engine.inputs import PromptLimits


class _Tokenizer:
    """Stands in for a tokenizer: one id per character, and the thread that encoded."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.threads.append(threading.get_ident())
        return [ord(c) % 500 + 1 for c in text]


def _servicer(tokenizer: _Tokenizer) -> InferenceServicer:
    return InferenceServicer(
        lambda: None,  # no ranks: only parsing is exercised
        tokenizer=tokenizer,
        limits=PromptLimits(512, 1 << 16),
        model=ModelDescription("stand-in", "", 512, 1 << 16, 8, 2, "float32"),
        settings=RouterSettings(),
    )


def _parse_where(servicer: InferenceServicer, request, monkeypatch) -> tuple[list[int], bool]:
    """(prompt ids, whether parsing ran on the event loop's thread)."""
    import router.servicer as mod

    threads: list[int] = []
    real = mod.parse_generate

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "parse_generate", recording)

    async def run():
        parsed = await servicer._parse(request)
        return parsed.prompt_token_ids, threads == [threading.get_ident()]

    return asyncio.run(run())


def test_token_ids_are_checked_on_the_loop_and_text_is_tokenized_off_it(monkeypatch):
    tok = _Tokenizer()
    servicer = _servicer(tok)
    ids, on_loop = _parse_where(
        servicer, generate_request(prompt_token_ids=[5, 6, 7], max_tokens=4), monkeypatch
    )
    assert ids == [5, 6, 7] and on_loop  # no hop to a worker thread for a few ids
    long_ids = [3] * (INLINE_PROMPT_IDS + 1)
    ids, on_loop = _parse_where(
        servicer, generate_request(prompt_token_ids=long_ids, max_tokens=4), monkeypatch
    )
    assert ids == long_ids and not on_loop  # a long list is checked off the loop
    ids, on_loop = _parse_where(servicer, generate_request("hey", max_tokens=4), monkeypatch)
    assert ids == tok.encode("hey") and not on_loop  # tokenizing never runs on the loop
