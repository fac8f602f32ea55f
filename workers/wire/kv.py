"""A `KVHandoff` to and from its wire form (`KVPayload`): tensors as raw bytes + dtype +
shape, and on the way in every one checked against the receiving rank's `KVSpec` before a
byte becomes a tensor (layer count, dtype, shape, byte count, prompt length).
"""

from __future__ import annotations

import math

import torch

from workers.engine.handoff import KVHandoff, KVSpec
from workers.messages import KVPayload, WireTensor
from workers.wire.errors import WireError

__all__ = ["from_payload", "to_payload"]

# what a handoff may carry: the engine's KV dtypes (an FP8 cache adds its own here)
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}


def _to_wire(t: torch.Tensor) -> WireTensor:
    t = t.detach().cpu().contiguous()
    data = t.view(-1).view(torch.uint8).numpy().data  # no copy; numpy has no bfloat16
    return WireTensor(str(t.dtype).removeprefix("torch."), list(t.shape), data)  # type: ignore[arg-type]


def to_payload(handoff: KVHandoff) -> KVPayload:
    return KVPayload(
        handoff.request_id,
        list(handoff.prompt_token_ids),
        handoff.first_token,
        handoff.num_emitted_chars,
        handoff.params,
        [_to_wire(t) for t in handoff.kv],
        handoff.logprobs,
    )


def _from_wire(w: WireTensor, shape: list[int], dtype: torch.dtype, layer: int) -> torch.Tensor:
    if DTYPES.get(w.dtype) != dtype:
        raise WireError(f"KV layer {layer} is {w.dtype!r}, this rank holds {dtype}")
    if w.shape != shape:
        raise WireError(f"KV layer {layer} has shape {w.shape}, this rank expects {shape}")
    if len(w.data) != math.prod(shape) * dtype.itemsize:
        raise WireError(f"KV layer {layer} has {len(w.data)} bytes for shape {shape}")
    return torch.frombuffer(bytearray(w.data), dtype=dtype).view(shape)


def from_payload(payload: KVPayload, spec: KVSpec) -> KVHandoff:
    """The handoff in `payload`; WireError when it does not fit `spec`."""
    p = len(payload.prompt_token_ids)
    if not 0 < p < spec.max_tokens:
        raise WireError(
            f"a KV handoff of {p} prompt tokens (this rank takes 1..{spec.max_tokens - 1})"
        )
    if len(payload.kv) != spec.num_layers:
        raise WireError(
            f"a KV handoff of {len(payload.kv)} layers, the model has {spec.num_layers}"
        )
    shape = [p, *spec.token_shape]
    kv = [_from_wire(w, shape, spec.dtype, i) for i, w in enumerate(payload.kv)]
    return KVHandoff(
        payload.request_id,
        payload.prompt_token_ids,
        payload.first_token,
        payload.num_emitted_chars,
        payload.params,
        kv,
        payload.logprobs,
    )
