"""`moe-cluster offline --ep N`: the prompts run on an N-rank expert-parallel group of Ray actors
(gloo on CPU, NCCL on CUDA), spread round-robin over the ranks; the output contract is unchanged.
The group can re-place its experts from observed load mid-run (`rebalance_every`).

The driver validates every prompt first (config + tokenizer only, no weights), starts an embedded
Ray when none is running, and always tears the actors (and the Ray it started) down.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.net import free_port
from workers.engine import EngineConfig, InvalidRequestError, RequestOutput
from workers.engine.build import load_tokenizer
from workers.engine.inputs import PromptLimits, encode_prompt
from workers.loader import load_config

__all__ = ["ExpertParallelGroup", "GroupError", "run_offline_ep"]


def _validate(model_dir: Path, specs: Sequence) -> None:
    config = load_config(model_dir)
    limits = PromptLimits(config.vocab_size, config.max_position_embeddings)
    tokenizer = load_tokenizer(model_dir)
    for spec in specs:
        try:
            text = spec.prompt if isinstance(spec.prompt, str) else None
            ids = None if isinstance(spec.prompt, str) else spec.prompt
            encode_prompt(tokenizer, limits, text, ids)
            spec.params.validate(config.vocab_size)
        except InvalidRequestError as e:
            raise InvalidRequestError(e.field, f"{spec.source}: {e}") from None


class GroupError(RuntimeError):
    """A rank of the group failed or timed out; the message says which and why."""


class ExpertParallelGroup:
    """N `ExpertParallelRank` actors forming one process group (gloo on CPU, NCCL on CUDA unless
    `backend` says otherwise). Use as a context manager: the actors (and the Ray this started,
    if any) are torn down on exit. `device="cuda"` gives each actor one GPU."""

    def __init__(
        self,
        model_dir: Path,
        ep: int,
        *,
        dtype: str = "float32",
        timeout_s: float = 900,
        device: str = "cpu",
        backend: str = "auto",
        num_redundant: int | None = None,
        load_window: int = 128,
        engine_config: EngineConfig | None = None,
        dispatch_transport: str = "auto",  # workers/moe/dispatch.py TRANSPORTS
    ) -> None:
        import ray

        from cluster.embedded import start_embedded_ray
        from workers.ep_rank import BACKENDS, ExpertParallelRank, resolve_backend

        if ep < 1:
            raise InvalidRequestError("ep", f"must be >= 1, got {ep}")
        from workers.moe.dispatch import TRANSPORTS

        if dispatch_transport not in TRANSPORTS:
            raise InvalidRequestError(
                "dispatch_transport",
                f"must be one of {', '.join(TRANSPORTS)}, got {dispatch_transport!r}",
            )
        try:  # fully checkable here on CPU; for CUDA the actors check where the GPUs are
            if backend not in BACKENDS or not device.startswith("cuda"):
                resolve_backend(backend, device)
        except ValueError as e:
            raise InvalidRequestError("backend", str(e)) from None
        self.ep, self.timeout_s = ep, timeout_s
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            start_embedded_ray(num_cpus=max(2, ep), include_dashboard=False)
        gpus = 1 if device.startswith("cuda") else 0
        rank_cls: Any = ray.remote(num_cpus=0, num_gpus=gpus)(ExpertParallelRank)  # no CPU slot
        init = f"tcp://127.0.0.1:{free_port()}"
        self.ranks = [
            rank_cls.remote(
                str(model_dir),
                rank=r,
                world_size=ep,
                init_method=init,
                dtype=dtype,
                threads=1,
                pin_cores=not device.startswith("cuda"),  # workers/cores.py: a core per rank
                device=device,
                backend=backend,
                num_redundant=num_redundant,
                load_window=load_window,
                engine_config=engine_config,
                dispatch_transport=dispatch_transport,
            )
            for r in range(ep)
        ]

    def ready(self) -> None:
        """Wait until every rank has joined the group and loaded its experts."""

        self._get([r.ready.remote() for r in self.ranks])

    def generate(self, specs: Sequence, rebalance_every: int | None = None) -> list[RequestOutput]:
        """Spread prompts round-robin over the ranks; outputs in input order. `rebalance_every`:
        re-place the experts from the observed load after every that many group steps."""

        ids = [f"p{i}" for i in range(len(specs))]
        shares = [
            [(ids[i], s.prompt, s.params) for i, s in enumerate(specs) if i % self.ep == r]
            for r in range(self.ep)
        ]
        refs = [
            rank.generate.remote(share, rebalance_every)
            for rank, share in zip(self.ranks, shares, strict=True)
        ]
        merged: dict[str, RequestOutput] = {}
        for result in self._get(refs):
            merged.update(result)
        return [merged[i] for i in ids]

    def call(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every rank at once (collectives need all of them); per-rank results.
        E.g. "placements", "expert_load", "apply_placements", "rebalance"."""

        refs = [getattr(rank, method).remote(*args) for rank in self.ranks]
        return self._get(refs)

    def _get(self, refs: list) -> list:
        """ray.get with the group's deadline; a failed or stuck rank becomes one clear error."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        try:
            while pending:  # fail fast: a dead rank leaves its peers blocked in a collective
                left = deadline - time.monotonic()
                done, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0))
                if not done:
                    raise GetTimeoutError()
                ray.get(done[0])
            return ray.get(refs)
        except GetTimeoutError:
            raise GroupError(
                f"the {self.ep}-rank group did not answer within {self.timeout_s:.0f} s"
            ) from None
        except RayError as e:
            cause = getattr(e, "cause", None) or e
            lines = str(cause).strip().splitlines()
            raise GroupError(
                f"an expert-parallel rank failed: {lines[-1] if lines else cause}"
            ) from None

    def __enter__(self) -> ExpertParallelGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        if self.started_ray:
            ray.shutdown()


def run_offline_ep(
    model_dir: Path,
    specs: Sequence,
    ep: int,
    *,
    dtype: str = "float32",
    timeout_s: float = 900,
    backend: str = "auto",
    rebalance_every: int | None = None,
    engine_config: EngineConfig | None = None,
) -> list[RequestOutput]:
    _validate(model_dir, specs)
    with ExpertParallelGroup(
        model_dir,
        ep,
        dtype=dtype,
        timeout_s=timeout_s,
        backend=backend,
        engine_config=engine_config,
    ) as group:
        return group.generate(specs, rebalance_every)
