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

__all__ = [
    "BlockHash",
    "block_hashes",
    "cache_salt",
    "is_summary_depth",
    "prompt_marks",
    "short_hash",
]

BlockHash = bytes  # 16-byte digest
_DIGEST = 16
SUMMARY_STRIDE = 16  # beyond the powers of two, every 16th block of a chain is reported


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
    first, full = len(out), len(token_ids) // block_size
    data = array("q", token_ids[first * block_size : full * block_size]).tobytes()
    step = block_size * 8  # bytes of one block's int64 tokens
    for at in range(0, len(data), step):
        parent = hashlib.blake2b(parent + data[at : at + step], digest_size=_DIGEST).digest()
        out.append(parent)
    return out


def short_hash(h: BlockHash) -> int:
    """64 bits of a block hash: what ranks report to routers (compact, collisions only cost
    a routing guess, never a wrong KV)."""
    return int.from_bytes(h[:8], "little")


def is_summary_depth(index: int) -> bool:
    """Chain positions ranks report to routers: blocks 0, 1, 3, 7, 15 (a power of two blocks
    deep), then every SUMMARY_STRIDE-th. A 1,024-token prefix in blocks of 16 is 8 entries;
    a router's estimate of a cached prefix is at most a factor 2 (short prefixes) or
    SUMMARY_STRIDE blocks (long ones) below the truth."""
    n = index + 1
    return n & (n - 1) == 0 or n % SUMMARY_STRIDE == 0


def prompt_marks(
    token_ids: Sequence[int], block_size: int, salt: BlockHash
) -> list[tuple[int, int]]:
    """(tokens covered, short hash) of the prompt's blocks at summary depths, shallow to deep,
    over the tokens a rank could take from its cache (all but the last, which always runs)."""
    hashes = block_hashes(token_ids[: max(0, len(token_ids) - 1)], block_size, salt)
    return [
        ((i + 1) * block_size, short_hash(h)) for i, h in enumerate(hashes) if is_summary_depth(i)
    ]
