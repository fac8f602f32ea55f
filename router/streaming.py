"""Deltas -> client messages: `stream_interval` tokens per message (vLLM's and SGLang's knob).

The first token leaves at once (time to first token is never delayed), then one message per
`interval` new tokens, and the last message as soon as the request ends, whatever it holds: it
carries finish_reason and usage. A KV handoff is not an end (the stream goes on from the decode
rank). Text and logprobs travel with their tokens; a multi-byte character split across deltas is
joined as the engine's detokenizer emits it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from workers.messages import Delta

__all__ = ["merge", "messages"]


def merge(a: Delta, b: Delta) -> Delta:
    """`a` then `b` of one request as one delta (b's finish and counts win)."""
    logprobs = None
    if a.logprobs is not None or b.logprobs is not None:
        logprobs = (a.logprobs or []) + (b.logprobs or [])
    return dataclasses.replace(
        b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=logprobs
    )


async def messages(deltas: AsyncIterator[Delta], interval: int) -> AsyncIterator[Delta]:
    """Group a request's deltas into what is sent to the client, `interval` tokens at a time."""
    pending: Delta | None = None
    sent_any = False
    async for d in deltas:
        pending = d if pending is None else merge(pending, d)
        ended = d.finished and d.finish_reason != "handoff"
        n = len(pending.token_ids)
        if ended or (n and (not sent_any or n >= interval)):
            yield pending
            sent_any = sent_any or n > 0
            pending = None
        if ended:
            return
