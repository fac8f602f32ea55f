"""`PrefillRank` and `DecodeRank`: one rank of a prefill or decode gang, as plain classes.

A rank is an `ExpertParallelRank` (its process group, its slice of the experts, its own requests'
KV cache) driven by a `RankLoop` thread that steps in lockstep with the gang. Request handlers
are coroutines on the caller's event loop; `cluster/app.py` wraps these classes as Serve
replicas and moves KV handoffs through the Ray object store.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from workers.engine import EngineConfig, KVHandoff
from workers.ep_rank import ExpertParallelRank
from workers.messages import Chunk, PrefillJob, RankStatus
from workers.rank_loop import RankLoop

__all__ = ["DecodeRank", "GangMember", "PrefillRank", "StageRank"]


@dataclass(frozen=True)
class GangMember:
    """Who a rank is: its gang (one expert-parallel process group) and its place in it."""

    gang_id: str
    rank: int
    world_size: int
    replica_id: str
    init_method: str  # tcp://host:port of the gang's rank 0 (torch.distributed rendezvous)


class _Rate:
    """Tokens per second over a sliding window of (time, total tokens) samples."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def update(self, now: float, total: int) -> float:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0


class StageRank:
    stage = ""

    def __init__(
        self,
        model_dir: str | Path,
        member: GangMember,
        *,
        dtype: str = "float32",
        engine_config: EngineConfig | None = None,
        threads: int = 1,
        device: str = "cpu",
        timeout_s: float = 300.0,
    ) -> None:
        self.member = member
        self.ep = ExpertParallelRank(
            model_dir,
            rank=member.rank,
            world_size=member.world_size,
            init_method=member.init_method,
            dtype=dtype,
            engine_config=engine_config,
            threads=threads,
            timeout_s=timeout_s,
            device=device,
        )
        self.engine = self.ep.engine
        self.loop = RankLoop(self.engine, self.ep.lockstep).start()
        self._rate = _Rate()
        # decoder layer index of each MoE layer, from module names like "layers.3.mlp.experts"
        moe = {id(m) for m in self.engine.model.moe_layers()}
        self._moe_layers = [
            int(name.split("layers.")[1].split(".")[0])
            for name, module in self.engine.model.named_modules()
            if id(module) in moe
        ]

    def check_health(self) -> None:
        """Raises when the rank's loop thread died (a collective or the engine failed)."""
        if self.loop.failed is not None:
            raise RuntimeError(f"{self.stage} rank loop failed: {self.loop.failed!r}")

    def status(self) -> RankStatus:
        s = self.loop.stats()
        now = time.time()
        load = self.ep.expert_load()  # [MoE layers, experts]
        return RankStatus(
            stage=self.stage,
            gang_id=self.member.gang_id,
            rank=self.member.rank,
            world_size=self.member.world_size,
            replica_id=self.member.replica_id,
            running_requests=s.num_requests,
            queued_prompt_tokens=s.num_queued_prompt_tokens,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total,
            tokens_per_s=self._rate.update(now, s.num_tokens_processed),
            tokens_processed=s.num_tokens_processed,
            expert_load=load.tolist(),
            moe_layers=self._moe_layers,
            time_s=now,
            **self._dispatch_bytes(),
        )

    def _dispatch_bytes(self) -> dict[str, int]:
        layers = self.engine.model.moe_layers()
        dispatcher = getattr(layers[0], "dispatcher", None) if layers else None
        counters = getattr(dispatcher, "counters", None)
        if counters is None:
            return {}
        try:  # read while the loop thread records: a layer's first record may resize the dict
            total = counters.overall()
        except RuntimeError:
            return {}
        return {
            "dispatch_bytes_sent": total.bytes_sent,
            "dispatch_bytes_received": total.bytes_received,
        }

    def close(self, timeout_s: float = 30.0, graceful: bool = False) -> None:
        """Stop the gang's loop (every rank stops at the same step) and leave the group.
        `graceful`: keep stepping with the gang until every rank is closing (scale-down: a
        peer's in-flight requests finish first)."""
        self.loop.stop(timeout_s, graceful=graceful)
        self.ep.close()


class PrefillRank(StageRank):
    stage = "prefill"

    async def prefill(self, job: PrefillJob) -> tuple[Chunk, KVHandoff | None]:
        """Run the prompt, sample the first token; returns it and the prompt's KV (None when
        the first token already finished the request). Bad input raises InvalidRequestError,
        a full queue QueueFullError; cancelling frees the KV."""
        stream = self.loop.generate(
            job.params, job.prompt_token_ids, request_id=job.request_id, prefill_only=True
        )
        async for out in stream:
            if out.finished:
                return Chunk.from_output(out), out.handoff
        raise RuntimeError(f"prefill of {job.request_id!r} ended without an output")


class DecodeRank(StageRank):
    stage = "decode"

    async def decode(self, handoff: KVHandoff) -> AsyncIterator[Chunk]:
        """Continue a prefilled request from its first token; streams the following chunks.
        Cancelling the consumer aborts the request and frees its KV blocks."""
        async for out in self.loop.generate(handoff.params, handoff=handoff):
            yield Chunk.from_output(out)
