"""`KVTransport`: how a prefilled prompt's KV travels from the prefill rank to a decode rank.

The seam: `put` on the prefill side returns a small `KVRef` that travels through the router;
`get` on the decode side returns the `KVHandoff`; `release` frees it when nobody will read it.
Ownership is explicit so a handoff is freed exactly once: the owner drops it when a decode rank
pulls it (`get` is a take), when the router releases it (request cancelled or failed before
the import), when the router's channel that produced it closes, or after `ttl_s` as a last
resort.

`PeerKVTransport`, the CPU/cross-node implementation: the owner keeps the KV in its own memory
and the decode rank pulls it over one authenticated connection to the owner's channel port
(`Fetch`; `workers/wire`), checking what arrives against its own `KVSpec` before importing it. Why
not the Ray object store: an `ObjectRef` handed through a non-Ray channel is either pinned until
its owner dies (out-of-band serialization) or freed under the reader (wave 1's
`ReferenceCountingAssertionError`). A GPU-direct transport (NCCL/NIXL) fits the same three calls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Protocol

from workers.engine.handoff import KVHandoff, KVSpec
from workers.messages import Fetch, Hello, KVData, KVRef
from workers.wire import MAX_FRAME_BYTES, WireError, WireKey, connect
from workers.wire.kv import from_payload

__all__ = ["KVStore", "KVTransport", "PeerKVTransport"]

log = logging.getLogger("moe_cluster.rank")
KV_FRAME_SLACK_BYTES = 1 << 20  # a KVData frame's fields around its tensors' bytes


class KVTransport(Protocol):
    def put(self, handoff: KVHandoff, session: str) -> KVRef: ...

    async def get(self, ref: KVRef, spec: KVSpec) -> KVHandoff | None: ...

    def release(self, key: str) -> None: ...


class KVStore:
    """The owner's side: handoffs waiting to be pulled, by key. Thread-safe (the rank loop
    puts, the channel thread takes and releases)."""

    def __init__(self, ttl_s: float = 120.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._items: dict[str, tuple[KVHandoff, str, float]] = {}  # key -> (kv, session, since)
        self._ids = itertools.count()

    def put(self, handoff: KVHandoff, session: str) -> str:
        key = f"{handoff.request_id}/{next(self._ids)}"
        with self._lock:
            self._expire()
            self._items[key] = (handoff, session, time.monotonic())
        return key

    def take(self, key: str) -> KVHandoff | None:
        with self._lock:
            item = self._items.pop(key, None)
        return None if item is None else item[0]

    def release(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def release_session(self, session: str) -> int:
        """Drop every handoff produced for `session` (its router is gone); returns how many."""
        with self._lock:
            keys = [k for k, (_, s, _) in self._items.items() if s == session]
            for k in keys:
                del self._items[k]
        return len(keys)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, _, t) in self._items.items() if now - t > self.ttl_s]:
            del self._items[k]


class PeerKVTransport:
    """KV kept by its owner and pulled by the decode rank over the owner's channel port."""

    def __init__(self, store: KVStore, host: str, port: int, peer_id: str, key: WireKey) -> None:
        self.store, self.host, self.port, self.peer_id = store, host, port, peer_id
        self._key = key

    def put(self, handoff: KVHandoff, session: str) -> KVRef:
        key = self.store.put(handoff, session)
        return KVRef(self.host, self.port, key, handoff.num_bytes)

    async def get(self, ref: KVRef, spec: KVSpec, timeout_s: float = 30.0) -> KVHandoff | None:
        """The handoff, checked against `spec`; None when its owner is gone, no longer has
        it, or sent something else (the decode rank then recomputes the prompt)."""
        if (ref.owner_host, ref.owner_port) == (self.host, self.port):
            return self.store.take(ref.key)
        limit = min(MAX_FRAME_BYTES, spec.token_bytes * spec.max_tokens + KV_FRAME_SLACK_BYTES)
        owner = f"{ref.owner_host}:{ref.owner_port}"
        try:
            async with asyncio.timeout(timeout_s):
                stream = await connect(
                    ref.owner_host, ref.owner_port, self._key, max_frame_bytes=limit
                )
                try:
                    stream.send(Hello(f"kv:{self.peer_id}"))
                    stream.send(Fetch(ref.key))
                    await stream.drain()
                    reply = await stream.recv()
                finally:
                    stream.close()
            if not isinstance(reply, KVData) or reply.handoff is None:
                return None
            return from_payload(reply.handoff, spec)
        except WireError as e:
            log.warning("KV pull from %s refused, recomputing the prompt: %s", owner, e)
            return None
        except (TimeoutError, OSError):
            return None

    def release(self, key: str) -> None:
        self.store.release(key)
