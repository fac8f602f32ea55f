"""The per-rank engine: paged KV cache + continuous batching scheduler + model + sampler.

One `step()` schedules a batch, runs the model once over all its new tokens (prefill chunks and
decodes together), samples one token for each sequence that reached the end of its known tokens,
applies stop rules and returns what changed. Not thread-safe: one thread drives an engine.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.block_hash import cache_salt
from workers.engine.block_manager import BlockManager
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.handoff import KVHandoff
from workers.engine.inputs import PromptLimits, encode_prompt
from workers.engine.params import InvalidRequestError, SamplingParams
from workers.engine.sampler import sample
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import Sequence as Seq
from workers.models.attention import AttentionMetadata
from workers.models.base import CausalLM

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "Resume"]


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: as many as fit in kv_cache_bytes
    kv_cache_bytes: int = 512 << 20  # KV cache budget when num_kv_blocks is None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # reuse the KV of full blocks whose token prefix was computed before (shared system
    # prompts, retries, preemption recompute); outputs are the same either way
    prefix_caching: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0  # seeds the generator shared by unseeded sampling requests


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated tokens so far
    text: str  # all generated text so far (stop string cut off)
    new_token_ids: list[int]  # tokens added by this step
    new_text: str  # text released by this step (held back while it may start a stop string)
    finished: bool
    # "stop" | "length" | "abort" | "error" once finished; "handoff" below
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    handoff: KVHandoff | None = None  # prefill_only requests: the prompt's KV for a decode rank
    error: str | None = None  # finish_reason "error": one sentence on why this request failed


@dataclass(frozen=True)
class Resume:
    """A request that already produced output elsewhere (a prefill rank's first token, or the
    tokens a failed rank streamed before it died): it continues after them, exactly as if it had
    run here from the start. Every output token was streamed; of their text, the first
    `num_emitted_chars` characters were (the rest was held back by a possible stop string)."""

    output_token_ids: list[int]
    num_emitted_chars: int
    logprobs: list[dict[int, float]] | None = None  # of output_token_ids, when asked for


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_queued_prompt_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_tokens_processed: int = 0  # prompt + generated tokens run through the model so far
    kv_blocks_cached: int = 0  # blocks in the prefix cache (in use or free to evict)
    prefix_query_tokens: int = 0  # tokens looked up in the prefix cache at admission, so far
    prefix_hit_tokens: int = 0  # of those, found cached (not computed again)
    prefix_evictions: int = 0  # cached blocks reused for other KV, so far

    @property
    def num_requests(self) -> int:
        """Requests the engine holds: running + waiting."""
        return self.num_running + self.num_waiting

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / max(1, self.prefix_query_tokens)


@dataclass(eq=False)
class _Tracked:
    seq: Seq
    detok: IncrementalDetokenizer | None
    emitted_chars: int = 0
    emitted_tokens: int = 0
    prefill_only: bool = False  # stop after the first token and export the prompt's KV


class Engine:
    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig | None = None,
        tokenizer=None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = model.vocab_size
        self.max_model_len = self.config.max_model_len or model.config.max_position_embeddings
        per_token = 1
        for d in model.kv_token_shape:
            per_token *= d
        bs = self.config.block_size
        num_blocks = self.config.num_kv_blocks or max(
            1,
            self.config.kv_cache_bytes
            // (model.num_layers * bs * per_token * param.element_size()),
        )
        config_dict = getattr(model.config, "to_dict", lambda: vars(model.config))()
        salt = cache_salt(type(model).__name__, config_dict, str(self.dtype), bs)
        self.blocks = BlockManager(
            num_blocks, bs, prefix_caching=self.config.prefix_caching, salt=salt
        )
        self.limits = PromptLimits(self.vocab_size, self.max_model_len, num_blocks * bs - 1)
        self.kv_cache = [  # one tensor per layer: [S, *kv_token_shape]
            torch.zeros(
                num_blocks * bs, *model.kv_token_shape, dtype=self.dtype, device=self.device
            )
            for _ in range(model.num_layers)
        ]
        self.scheduler = Scheduler(self.config.scheduler, self.blocks)
        self._requests: dict[str, _Tracked] = {}
        self._arrivals = itertools.count()
        self.num_tokens_processed = 0  # prompt + generated tokens run through the model
        self.last_batch: list[tuple[str, int, int]] = []  # (request id, start, tokens) last step
        self._generator = torch.Generator().manual_seed(self.config.seed)

    # --- requests ----------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        params: SamplingParams,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        prefill_only: bool = False,
        resume: Resume | None = None,
        kv: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Validate and queue a request. Raises InvalidRequestError or QueueFullError.
        `prefill_only`: finish after the first token with finish_reason "handoff" and the
        prompt's KV in `RequestOutput.handoff` (unless the first token already ends it).
        `resume`: continue after output already streamed elsewhere (not emitted again); its
        tokens are recomputed here unless `kv` (per layer [P, *kv_token_shape], the prompt's
        cache entries from a prefill rank) is given and the blocks are free now; prompt blocks
        this engine has cached are shared, not copied."""
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        ids = self.encode(prompt, prompt_token_ids)
        params.validate(self.vocab_size)
        seq = Seq(request_id, ids, params, arrival=next(self._arrivals))
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer else None
        tracked = _Tracked(seq, detok, prefill_only=prefill_only)
        if resume is not None:
            self._resume(tracked, resume)
        if kv is not None and resume and self._import(seq, kv):
            self.scheduler.adopt_running(seq)
        else:
            self.scheduler.add(seq)
        self._requests[request_id] = tracked

    def _import(self, seq: Seq, kv: Sequence[torch.Tensor]) -> bool:
        """Put a handed-over prompt's KV into blocks: the cached prefix is shared, the rest
        copied. False (nothing held) when the blocks are not free now."""
        p = len(seq.prompt_token_ids)
        hit = self.blocks.take_cached(seq, max_tokens=p)
        if not self.blocks.can_allocate(seq, seq.num_tokens):
            self.blocks.free(seq)
            return False
        self.blocks.record_lookup(p, hit)
        self.blocks.allocate(seq, seq.num_tokens)
        slots = self._slots(seq, p)[hit:]
        for cache, entries in zip(self.kv_cache, kv, strict=True):
            cache.index_copy_(0, slots, entries[hit:].to(cache.device, cache.dtype))
        seq.num_computed = p
        self.blocks.commit(seq)
        return True

    def _resume(self, tracked: _Tracked, resume: Resume) -> None:
        seq = tracked.seq
        if len(resume.output_token_ids) >= seq.params.max_tokens:
            raise InvalidRequestError(
                "resume", "the request already has max_tokens outputs; nothing is left to run"
            )
        for t in resume.output_token_ids:
            if not 0 <= t < self.vocab_size:
                raise InvalidRequestError("resume", f"token id {t} is outside the vocabulary")
            seq.output_token_ids.append(t)
            if tracked.detok is not None:
                seq.text += tracked.detok.add(t)
        seq.logprobs = list(resume.logprobs or [])
        tracked.emitted_tokens = len(seq.output_token_ids)
        tracked.emitted_chars = min(resume.num_emitted_chars, len(seq.text))

    def add_prefilled(self, handoff: KVHandoff) -> None:
        """Continue a request a prefill rank started: its prompt's KV goes into this rank's
        blocks and decoding resumes after the first token (not emitted again). When the blocks
        are not free now, the request waits and recomputes its prompt here instead."""
        resume = Resume([handoff.first_token], handoff.num_emitted_chars, handoff.logprobs)
        self.add_request(
            handoff.request_id,
            handoff.params,
            prompt_token_ids=handoff.prompt_token_ids,
            resume=resume,
            kv=handoff.kv,
        )

    def _slots(self, seq: Seq, n: int) -> torch.Tensor:
        """Cache slots of `seq`'s first n tokens: [n] int64."""
        bs = self.blocks.block_size
        table = torch.as_tensor(seq.block_table, dtype=torch.int64)
        pos = torch.arange(n)
        return (table[pos // bs] * bs + pos % bs).to(self.device)

    def _export(self, seq: Seq) -> KVHandoff:
        p = len(seq.prompt_token_ids)
        slots = self._slots(seq, p)
        return KVHandoff(
            request_id=seq.request_id,
            prompt_token_ids=list(seq.prompt_token_ids),
            first_token=seq.output_token_ids[0],
            num_emitted_chars=0,  # set by _append once this step's text is released
            params=seq.params,
            kv=[cache[slots].cpu().contiguous() for cache in self.kv_cache],
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
        )

    def encode(self, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
        """The prompt as token ids, checked against the vocabulary, context and KV capacity."""
        return encode_prompt(self.tokenizer, self.limits, prompt, prompt_token_ids)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks. True if it was known and unfinished."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None or tracked.seq.finished:
            return False
        self.scheduler.finish(tracked.seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_queued_prompt_tokens=self.scheduler.num_queued_prompt_tokens,
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_tokens_processed=self.num_tokens_processed,
            kv_blocks_cached=self.blocks.num_cached,
            prefix_query_tokens=self.blocks.num_query_tokens,
            prefix_hit_tokens=self.blocks.num_hit_tokens,
            prefix_evictions=self.blocks.num_evictions,
        )

    # --- stepping ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, participate: bool = False) -> list[RequestOutput]:
        """Run one batch. `participate`: this rank is in an expert-parallel group whose other
        ranks are stepping, so with nothing to run it still runs an empty forward (zero tokens)
        to take its part in every MoE layer's collectives."""
        batch = self.scheduler.schedule()
        self.last_batch = [(b.seq.request_id, b.seq.num_computed, b.num_new) for b in batch]
        if not batch:
            if participate:
                self._open_load_step()
                empty = torch.zeros(0, dtype=torch.int64, device=self.device)
                self.model(empty, AttentionMetadata.empty(self.device), self.kv_cache)
            return []
        meta = AttentionMetadata.build(
            [b.seq.num_computed for b in batch],
            [b.num_new for b in batch],
            [b.seq.block_table for b in batch],
            self.blocks.block_size,
            self.device,
        )
        ids = [
            t
            for b in batch
            for t in b.seq.token_slice(b.seq.num_computed, b.seq.num_computed + b.num_new)
        ]
        self._open_load_step()
        hidden = self.model(torch.tensor(ids, device=self.device), meta, self.kv_cache)  # [T, H]
        self.num_tokens_processed += len(ids)
        rows = [i for i, b in enumerate(batch) if b.samples]
        for b in batch:
            b.seq.num_computed += b.num_new
            self.blocks.commit(b.seq)
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[meta.last_token_index[rows]])  # [N, V]
        seqs = [batch[i].seq for i in rows]
        sampled = sample(
            logits,
            [s.params for s in seqs],
            [len(s.output_token_ids) for s in seqs],
            self._generator,
        )
        outputs = []
        for i, seq in enumerate(seqs):
            error = sampled.errors.get(i)
            if error is None:
                try:  # stop rules, detokenization, export: a failure ends this request only
                    outputs.append(self._append(seq, sampled.tokens[i], sampled.logprobs[i]))
                    continue
                except Exception as e:
                    error = f"{type(e).__name__} while finishing a step: {e}"
            outputs.append(self._fail(seq, error))
        return outputs

    def _fail(self, seq: Seq, error: str) -> RequestOutput:
        """End one request with finish_reason "error"; the rest of the batch goes on."""
        if not seq.finished:
            self.scheduler.finish(seq, "error")
        self._requests.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=seq.text,
            new_token_ids=[],
            new_text="",
            finished=True,
            finish_reason="error",
            error=error,
        )

    def _open_load_step(self) -> None:
        """One expert-load step per forward, opened before it: after a forward the model's
        `expert_load.totals()` covers exactly the last `window` forwards (empty ones included,
        so every rank of a lockstep group has the same window)."""
        if self.model.expert_load is not None:
            self.model.expert_load.step()

    def _append(self, seq: Seq, token: int, logprobs: dict[int, float] | None) -> RequestOutput:
        tracked = self._requests[seq.request_id]
        p = seq.params
        seq.output_token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        reason: str | None = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif tracked.detok is not None:
            seq.text += tracked.detok.add(token)
            reason = self._cut_stop_string(seq)
        if reason is None and (
            len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        handoff = None
        if reason is None and tracked.prefill_only:
            handoff, reason = self._export(seq), "handoff"
        # text that may still start a stop string is held back, also across a handoff
        done = reason is not None and reason != "handoff"
        hold = 0 if done or not p.stop else max(len(s) for s in p.stop) - 1
        visible = len(seq.text) - hold
        new_text = seq.text[tracked.emitted_chars : max(visible, tracked.emitted_chars)]
        tracked.emitted_chars += len(new_text)
        if handoff is not None:
            handoff = dataclasses.replace(handoff, num_emitted_chars=tracked.emitted_chars)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._requests[seq.request_id]
        new_ids = seq.output_token_ids[tracked.emitted_tokens :]
        tracked.emitted_tokens = len(seq.output_token_ids)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=seq.text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=list(seq.logprobs) if p.logprobs is not None else None,
            handoff=handoff,
        )

    @staticmethod
    def _cut_stop_string(seq: Seq) -> str | None:
        hits = [at for s in seq.params.stop if (at := seq.text.find(s)) >= 0]
        if not hits:
            return None
        seq.text = seq.text[: min(hits)]
        return "stop"

    def generate(
        self, requests: Sequence[tuple[str | Sequence[int], SamplingParams]]
    ) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion together; outputs in input order."""
        ids = [f"offline-{next(self._arrivals)}" for _ in requests]
        for rid, (prompt, params) in zip(ids, requests, strict=True):
            if isinstance(prompt, str):
                self.add_request(rid, params, prompt=prompt)
            else:
                self.add_request(rid, params, prompt_token_ids=prompt)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in ids]
