"""The prompt's KV, handed from a prefill rank to a decode rank (disaggregated serving).

A prefill rank runs the prompt, samples the first token and exports the prompt's cache entries;
a decode rank imports them into its own blocks and continues from the first token. For MLA the
entries are the compressed latent + rope key, so the handoff is small. Everything in it is plain
CPU data; across processes it travels as a `KVPayload` (`workers/wire/kv.py`), checked against
the receiver's `KVSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.engine.params import SamplingParams

__all__ = ["KVHandoff", "KVSpec"]


@dataclass(frozen=True)
class KVHandoff:
    request_id: str
    prompt_token_ids: list[int]  # P tokens whose KV is in `kv`
    first_token: int  # sampled by the prefill rank (already streamed to the client)
    num_emitted_chars: int  # characters of the first token's text released with it
    params: SamplingParams  # the request's sampling parameters, unchanged (seeds are
    #                         counter-based, so a seeded stream needs no generator state)
    kv: list[torch.Tensor]  # per layer [P, *kv_token_shape], CPU, contiguous
    logprobs: list[dict[int, float]] | None  # the first token's logprobs, if asked for

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


@dataclass(frozen=True)
class KVSpec:
    """What a rank's KV cache entries look like: a handoff it imports must match."""

    num_layers: int
    token_shape: tuple[int, ...]  # one layer's entry for one token
    dtype: torch.dtype
    max_tokens: int  # the longest prompt the rank takes

    @property
    def token_bytes(self) -> int:
        """One token's entries over all layers, in bytes."""
        return self.num_layers * self.dtype.itemsize * math.prod(self.token_shape)

    @classmethod
    def of(cls, engine) -> KVSpec:  # an Engine (not imported: engine.py imports this file)
        return cls(
            engine.model.num_layers,
            tuple(engine.model.kv_token_shape),
            engine.dtype,
            engine.limits.max_model_len,
        )
