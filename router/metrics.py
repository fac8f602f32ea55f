"""The router's Ray metrics (`ray_moe_*` on Ray's Prometheus endpoint): what clients feel."""

from __future__ import annotations

__all__ = ["ITL_SAMPLE", "RouterMetrics"]

ITL_SAMPLE = 8  # one inter-token gap of a request in this many is observed (router/servicer.py)

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class RouterMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.ttft = Histogram(
            "moe_ttft_seconds", "time from request to its first token", _LATENCY_S
        )
        self.itl = Histogram(
            "moe_itl_seconds",
            "time between two streamed tokens of one request (sampled: the first gap of each "
            f"request and every {ITL_SAMPLE}th after it)",
            _LATENCY_S,
        )
        self.requests = Counter(
            "moe_requests_total", "Generate calls ended, by finish reason", ("finish_reason",)
        )
        self.tokens = Counter("moe_generated_tokens_total", "tokens streamed to clients")
