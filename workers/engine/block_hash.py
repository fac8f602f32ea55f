"""Content hashes of full KV blocks, chained from the first block (vLLM's prefix-cache keys).

Block i's hash covers the hash of block i-1 and block i's tokens, so equal hashes mean equal
token prefixes up to and including that block (and so equal KV, for one model). The root is a
salt naming everything else the KV depends on (model, dtype, block size). blake2b rather than
Python's `hash()`: the same in every process (routers compare ranks' hashes with their own) and
not open to crafted collisions between tenants' prompts.

Pure functions over token lists; the router and the engine both use them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

__all__ = ["BlockHash", "block_hashes", "cache_salt", "short_hash"]

BlockHash = bytes  # 16-byte digest
_DIGEST = 16


def cache_salt(*parts: object) -> BlockHash:
    """The chain's root: a digest of whatever besides tokens decides the KV."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=_DIGEST).digest()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    salt: BlockHash,
    known: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`; the first len(known) are taken as given
    (the caller's earlier result for the same prefix) and only the rest are computed."""
    out = list(known)
    parent = out[-1] if out else salt
    for start in range(len(out) * block_size, len(token_ids) - block_size + 1, block_size):
        chunk = array("q", token_ids[start : start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=_DIGEST).digest()
        out.append(parent)
    return out


def short_hash(h: BlockHash) -> int:
    """64 bits of a block hash: what ranks report to routers (compact, collisions only cost
    a routing guess, never a wrong KV)."""
    return int.from_bytes(h[:8], "little")
