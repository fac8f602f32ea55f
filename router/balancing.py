"""Per-stage balancing of ranks (DeepSeek's serving balancers) as pure functions over each
rank's `RankLoad`: its last report over its channel plus what this router submitted there that
the rank has not taken in yet (`router/channels.py`), so a burst spreads instead of piling onto
the rank that looked idle.

- prefill: fewest queued prompt tokens; ties go to the rank that last took the same prompt
  prefix (prefix affinity), then to the lower replica id.
- decode: lowest KV usage, then fewest running requests, then the lower replica id.
"""

from __future__ import annotations

from workers.messages import RankLoad

__all__ = ["PREFIX_TOKENS", "RankLoad", "prefix_key", "rank_decode", "rank_prefill"]

PREFIX_TOKENS = 32  # prompt tokens that make the affinity key


def rank_prefill(loads: list[RankLoad], affinity: str | None = None) -> list[str]:
    """Replica ids best first: fewest queued prompt tokens; ties: `affinity` first, then id."""
    return [
        r.key
        for r in sorted(loads, key=lambda r: (r.queued_prompt_tokens, r.key != affinity, r.key))
    ]


def rank_decode(loads: list[RankLoad]) -> list[str]:
    """Replica ids best first: lowest KV usage, then fewest running requests, then id."""
    return [r.key for r in sorted(loads, key=lambda r: (r.kv_usage, r.running_requests, r.key))]


def prefix_key(prompt_token_ids: list[int]) -> tuple[int, ...]:
    return tuple(prompt_token_ids[:PREFIX_TOKENS])
