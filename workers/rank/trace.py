"""Optional per-step trace of a rank: one JSON line per engine step, for explaining schedules.

Set `MOE_STEP_TRACE=<directory>` in a rank's environment (e.g. `runtime_env.env_vars`) and each
rank appends to `<directory>/<stage>-<gang>-<rank>.jsonl`:
`{"t": wall-clock start s, "dur": s, "batch": [[request id, first position, tokens], ...],
"waiting": n, "running": n}`. Off (no cost beyond one branch per step) when unset.
"""

from __future__ import annotations

import json
import os
from typing import TextIO

from workers.engine import Engine

__all__ = ["StepTrace"]

ENV = "MOE_STEP_TRACE"


class StepTrace:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    @classmethod
    def from_env(cls, stage: str, gang_id: str, rank: int) -> StepTrace | None:
        directory = os.environ.get(ENV)
        if not directory:
            return None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{stage}-{gang_id}-{rank}.jsonl")
        return cls(open(path, "a", buffering=1))  # noqa: SIM115 - kept open by the rank loop

    def record(self, start: float, end: float, engine: Engine) -> None:
        stats = engine.stats()
        line = {
            "t": round(start, 4),
            "dur": round(end - start, 4),
            "batch": engine.last_batch,
            "waiting": stats.num_waiting,
            "running": stats.num_running,
        }
        self._out.write(json.dumps(line) + "\n")
