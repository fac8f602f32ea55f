"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step forms one batch under a token budget: running sequences first (decodes, one token
each, then unfinished prompts with their next chunk, oldest first; at most `max_prefill_chunk`
tokens while other prompts want the budget too), then waiting sequences are admitted while the
budget, the sequence limit and free KV blocks allow, each starting after the longest prefix
of its tokens the block manager has cached; budget the chunk cap left unused goes to
the prompts nearest to done (their first tokens come sooner). When a running sequence cannot
get a block, the newest running sequence is preempted: its blocks are freed and it goes back
to the front of the queue to recompute its prompt and the tokens generated so far (the blocks
it filled stay cached while nobody needs them, so the recompute is mostly cache hits).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.engine.block_manager import BlockManager
from workers.engine.params import QueueFullError
from workers.engine.sequence import Sequence, SequenceStatus

__all__ = ["ScheduledSeq", "Scheduler", "SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences in one batch at most
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_waiting: int = 4096  # bounded waiting queue; beyond it add() raises QueueFullError
    # Most prompt tokens one sequence computes in a step while other prompts also want the
    # budget (vLLM's long_prefill_token_threshold): a long prompt then shares each step with the
    # prompts behind it instead of holding them until it is done; budget the cap leaves unused
    # goes to the prompts nearest to done. None: no cap.
    max_prefill_chunk: int | None = None


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed for `seq` in this step

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence's known tokens."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_queued_prompt_tokens(self) -> int:
        """Prompt tokens still to compute: waiting sequences (less what was cached when they
        were queued) and the rest of chunked prefills."""
        waiting = sum(s.num_tokens - max(s.num_computed, s.num_cached_hint) for s in self.waiting)
        return waiting + sum(max(0, len(s.prompt_token_ids) - s.num_computed) for s in self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"waiting queue is full ({self.config.max_waiting} requests); retry later"
            )
        seq.status = SequenceStatus.WAITING
        seq.num_cached_hint = self.blocks.match(seq)
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        plan: dict[Sequence, int] = {}  # tokens of each sequence this step, in batch order
        preempted = False
        prompts = len(self.waiting) + sum(self._left(s) > 1 for s in self.running)
        cap = self.config.max_prefill_chunk if prompts > 1 else None
        # decodes before prompt chunks, so a long prefill never holds back running streams
        for seq in sorted(self.running, key=lambda s: (self._left(s) > 1, s.arrival)):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(self._left(seq), budget, cap or budget)
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            plan[seq] = n
            budget -= n
        # blocks running prompts are computing: a waiting prompt that needs one of them next
        # waits for it to be cached instead of computing it again (SGLang's in-batch prefix
        # sharing); the prompts behind it go first
        computing = {h for s in self.running if self._left(s) > 1 for h in self.blocks.pending(s)}
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting.popleft()
            hit = self.blocks.take_cached(seq)  # shared prefix: computed already
            if computing and self.blocks.next_hash(seq) in computing:
                self.blocks.free(seq)  # the cached blocks it took for admission
                deferred.append(seq)
                continue
            n = min(self._left(seq), budget, cap or budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                self.blocks.free(seq)  # the cached blocks it took for admission
                self.waiting.appendleft(seq)
                break
            self.blocks.record_lookup(seq.num_tokens, hit)
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            plan[seq] = n
            budget -= n
            computing.update(self.blocks.pending(seq))
        self.waiting.extendleft(reversed(deferred))
        if cap is not None and not preempted:  # budget the cap left: the nearest-done prompts
            for seq in sorted(plan, key=lambda s: self._left(s) - plan[s]):
                n = plan[seq]
                extra = min(self._left(seq) - n, budget)
                if extra > 0 and self.blocks.can_allocate(seq, seq.num_computed + n + extra):
                    self.blocks.allocate(seq, seq.num_computed + n + extra)
                    plan[seq] = n + extra
                    budget -= extra
        return [ScheduledSeq(seq, n) for seq, n in plan.items()]

    @staticmethod
    def _left(seq: Sequence) -> int:
        """Tokens of `seq` not computed yet (1 for a decode)."""
        return seq.num_tokens - seq.num_computed

    def adopt_running(self, seq: Sequence) -> None:
        """Take a sequence whose blocks are allocated and KV filled (a handed-over prompt)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished (stop/length/abort) and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
