"""Per-rank engine: paged KV cache, continuous batching, sampling, detokenization."""

from workers.engine.engine import Engine, EngineConfig, EngineStats, RequestOutput, Resume
from workers.engine.handoff import KVHandoff
from workers.engine.params import InvalidRequestError, QueueFullError, SamplingParams
from workers.engine.scheduler import SchedulerConfig

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "InvalidRequestError",
    "KVHandoff",
    "QueueFullError",
    "RequestOutput",
    "Resume",
    "SamplingParams",
    "SchedulerConfig",
]
