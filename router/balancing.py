"""Per-stage balancing of ranks (DeepSeek's serving balancers, with a prefix-cache-aware
prefill score) as pure functions over each rank's `RankLoad`: its last report over its
channel plus what this router submitted there that the rank has not taken in yet
(`router/channels.py`), so a burst spreads instead of piling onto the rank that looked idle.

- prefill: least work before this prompt's first token,

      cost(rank) = queued_prompt_tokens(rank) + prompt_tokens - cached_tokens(rank, prompt)

  (what Dynamo's KV router and llm-d's prefix scorer weigh, in tokens: a rank holding a
  1,000-token system prompt wins until its queue is ~1,000 tokens longer than the others'),
  then the most cached tokens, then the lower replica id. `cached_tokens` is the deepest of
  the prompt's summary blocks (`block_hash.prompt_marks`) the rank reported holding or this
  router sent it recently. Without a prefix cache it is 0: fewest queued prompt tokens.
- decode: lowest KV usage, then fewest running requests, then the lower replica id.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

from workers.messages import RankLoad

__all__ = ["RankLoad", "cached_tokens", "prefill_cost", "rank_decode", "rank_prefill"]


def cached_tokens(marks: Sequence[tuple[int, int]], *held: Container[int]) -> int:
    """Tokens of a prompt a rank holds: the deepest `(tokens, short hash)` mark (marks shallow
    to deep) found in any of `held`; 0 when none is."""
    for tokens, h in reversed(marks):
        if any(h in s for s in held):
            return tokens
    return 0


def prefill_cost(load: RankLoad, prompt_tokens: int, cached: int = 0) -> int:
    """Prompt tokens `load`'s rank computes before this prompt's first token."""
    return load.queued_prompt_tokens + prompt_tokens - cached


def rank_prefill(
    loads: list[RankLoad], prompt_tokens: int = 0, cached: Mapping[str, int] | None = None
) -> list[str]:
    """Replica ids best first by `prefill_cost`, then most cached tokens, then id."""
    got = cached or {}
    return [
        r.key
        for r in sorted(
            loads,
            key=lambda r: (
                prefill_cost(r, prompt_tokens, got.get(r.key, 0)),
                -got.get(r.key, 0),
                r.key,
            ),
        )
    ]


def rank_decode(loads: list[RankLoad]) -> list[str]:
    """Replica ids best first: lowest KV usage, then fewest running requests, then id."""
    return [r.key for r in sorted(loads, key=lambda r: (r.kv_usage, r.running_requests, r.key))]
