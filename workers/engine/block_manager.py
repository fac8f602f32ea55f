"""Fixed-size KV blocks of one rank's cache: allocation, sharing and the prefix cache.

Every block has a reference count: the sequences whose block table holds it. With prefix
caching on, a block whose tokens are all computed is registered under its chained content
hash (`block_hash.py`); a new sequence starts from the longest chain of registered blocks that
matches its tokens, sharing them read-only (a sequence only ever writes past its shared
prefix, into blocks of its own). A block nobody references keeps its KV and its hash until the
allocator needs it: uncached free blocks are handed out first, then cached ones, least recently
released first (a sequence releases its tail first, so a chain is evicted from its end).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from workers.engine.block_hash import BlockHash, block_hashes, is_summary_depth, short_hash
from workers.engine.sequence import Sequence

__all__ = ["BlockManager"]


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = False,
        salt: BlockHash = b"",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.salt = salt
        self._refs = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        # registered blocks at summary depths -> short hash, least recently used first
        self._marks: OrderedDict[int, int] = OrderedDict()
        self._by_hash: dict[BlockHash, int] = {}
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self.version = 0  # changes whenever the set of cached blocks does
        # counters since start: tokens looked up at admission / found cached / blocks evicted
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (cached ones nobody uses included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence references."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (in use or not)."""
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that `num_tokens` tokens fit."""
        want = -(-num_tokens // self.block_size)
        return max(0, want - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, free {self.num_free}")
        for _ in range(need):
            block = self._take_free()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references (tail first); its computed KV stays cached while unused.
        Without blocks nothing of `seq` counts as computed."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None
                    self._touch(block)
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.num_computed = 0

    # --- the prefix cache --------------------------------------------------------------
    def hashes(self, seq: Sequence, num_tokens: int) -> list[BlockHash]:
        """Chained hashes of `seq`'s full blocks within its first `num_tokens` tokens
        (memoized on the sequence: its tokens only ever grow)."""
        n = num_tokens // self.block_size
        if len(seq.block_hashes) < n:
            tokens = seq.token_slice(0, n * self.block_size)
            seq.block_hashes = block_hashes(tokens, self.block_size, self.salt, seq.block_hashes)
        return seq.block_hashes[:n]

    def match(self, seq: Sequence, max_tokens: int | None = None) -> int:
        """Tokens at the start of `seq` whose KV is cached here, in whole blocks, at most
        `max_tokens` (default: all but the last token, which must run to give logits)."""
        if not self.prefix_caching:
            return 0
        limit = seq.num_tokens - 1 if max_tokens is None else max_tokens
        n = 0
        for h in self.hashes(seq, limit):
            if h not in self._by_hash:
                break
            n += 1
        return n * self.block_size

    def take_cached(self, seq: Sequence, max_tokens: int | None = None) -> int:
        """For a sequence holding no blocks: share the longest cached chain of its blocks
        (see `match`) and count those tokens computed. Returns the tokens taken."""
        assert not seq.block_table, "take_cached is for a sequence with no blocks"
        n = self.match(seq, max_tokens) // self.block_size
        for h in seq.block_hashes[:n]:
            block = self._by_hash[h]
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            self._touch(block)
            seq.block_table.append(block)
        seq.num_committed_blocks = n
        seq.num_computed = n * self.block_size
        return seq.num_computed

    def next_hash(self, seq: Sequence) -> BlockHash | None:
        """The hash of `seq`'s first block not computed yet (None: no such full block, or no
        prefix cache)."""
        if not self.prefix_caching:
            return None
        i = seq.num_computed // self.block_size
        hashes = self.hashes(seq, seq.num_tokens - 1)
        return hashes[i] if i < len(hashes) else None

    def pending(self, seq: Sequence) -> list[BlockHash]:
        """Hashes of `seq`'s full blocks that join the cache once computed."""
        if not self.prefix_caching:
            return []
        return self.hashes(seq, seq.num_tokens)[seq.num_committed_blocks :]

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count one admission: `num_tokens` looked up, `num_hit` of them found cached."""
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit

    def commit(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that became full of computed KV (after a step or an
        import). A block whose content is already cached elsewhere stays private."""
        if not self.prefix_caching:
            return
        n = seq.num_computed // self.block_size
        start = seq.num_committed_blocks
        if n <= start:
            return
        for i, h in enumerate(self.hashes(seq, n * self.block_size)[start:], start):
            block = seq.block_table[i]
            if self._hash[block] is None and h not in self._by_hash:
                self._hash[block] = h
                self._by_hash[h] = block
                if is_summary_depth(i):
                    self._marks[block] = short_hash(h)
                self.version += 1
        seq.num_committed_blocks = n

    def summary(self, limit: int) -> frozenset[int]:
        """Short hashes of the `limit` most recently used cached blocks at summary depths
        (`block_hash.is_summary_depth`): what a rank tells routers it holds."""
        return frozenset(self._marks[b] for b in itertools.islice(reversed(self._marks), limit))

    def _touch(self, block: int) -> None:
        if block in self._marks:
            self._marks.move_to_end(block)

    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)
        del self._by_hash[self._hash[block]]  # type: ignore[arg-type]
        self._hash[block] = None
        self._marks.pop(block, None)
        self.num_evictions += 1
        self.version += 1
        return block
