"""Ray metrics of the ranks (exported on Ray's Prometheus endpoint as `ray_moe_*`; the Grafana
dashboard in deploy/grafana/ reads them). The router's own metrics are in router/metrics.py.

Each rank sets its gauges from its latest `RankStatus` every METRICS_PERIOD_S (each record
is Python work in the rank's process, and Ray exports far less often than the ranks report);
cumulative counters (dispatch bytes, prefix-cache tokens) advance by the difference since the
previous update.
"""

from __future__ import annotations

from workers.messages import RankStatus

__all__ = ["METRICS_PERIOD_S", "RankMetrics"]

METRICS_PERIOD_S = 2.0

_RANK_TAGS = ("stage", "gang", "rank")


class RankMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.queued = Gauge(
            "moe_queued_prompt_tokens", "prompt tokens waiting to be prefilled", _RANK_TAGS
        )
        self.kv_usage = Gauge("moe_kv_usage", "KV cache blocks in use / blocks (0..1)", _RANK_TAGS)
        self.kv_used = Gauge("moe_kv_blocks_used", "KV cache blocks in use", _RANK_TAGS)
        self.running = Gauge("moe_running_requests", "requests the rank holds", _RANK_TAGS)
        self.tokens_per_s = Gauge("moe_rank_tokens_per_second", "tokens run per second", _RANK_TAGS)
        self.imbalance = Gauge(
            "moe_expert_load_imbalance",
            "max / mean tokens per expert of one MoE layer over recent steps (1 = even)",
            (*_RANK_TAGS, "layer"),
        )
        self.layer_tokens = Gauge(
            "moe_expert_load_tokens",
            "expert picks of one MoE layer over recent steps (this rank's tokens)",
            (*_RANK_TAGS, "layer"),
        )
        self.dispatch = Counter(
            "moe_dispatch_bytes_total",
            "MoE all-to-all bytes exchanged with other ranks",
            (*_RANK_TAGS, "direction"),
        )
        self.kv_cached = Gauge(
            "moe_kv_blocks_cached", "KV blocks held in the prefix cache", _RANK_TAGS
        )
        self.prefix_hit_rate = Gauge(
            "moe_prefix_cache_hit_rate",
            "prefix-cache hit tokens / looked-up tokens since the rank started (0..1)",
            _RANK_TAGS,
        )
        self.prefix_query = Counter(
            "moe_prefix_cache_query_tokens_total",
            "tokens of admitted requests looked up in the prefix cache",
            _RANK_TAGS,
        )
        self.prefix_hits = Counter(
            "moe_prefix_cache_hit_tokens_total",
            "tokens found in the prefix cache (prefill not computed again)",
            _RANK_TAGS,
        )
        self._sent = self._received = self._queried = self._hit = 0

    def update(self, s: RankStatus) -> None:
        tags = {"stage": s.stage, "gang": s.gang_id, "rank": str(s.rank)}
        self.queued.set(s.queued_prompt_tokens, tags)
        self.kv_usage.set(s.kv_usage, tags)
        self.kv_used.set(s.kv_blocks_used, tags)
        self.running.set(s.running_requests, tags)
        self.tokens_per_s.set(s.tokens_per_s, tags)
        self.kv_cached.set(s.kv_blocks_cached, tags)
        self.prefix_hit_rate.set(s.prefix_hit_rate, tags)
        for layer, counts in zip(s.moe_layers, s.expert_load, strict=True):
            total = sum(counts)
            layer_tags = {**tags, "layer": str(layer)}
            self.layer_tokens.set(total, layer_tags)
            if total:
                self.imbalance.set(max(counts) / (total / len(counts)), layer_tags)
        for counter, extra, now, attr in (
            (self.dispatch, {"direction": "sent"}, s.dispatch_bytes_sent, "_sent"),
            (self.dispatch, {"direction": "received"}, s.dispatch_bytes_received, "_received"),
            (self.prefix_query, {}, s.prefix_query_tokens, "_queried"),
            (self.prefix_hits, {}, s.prefix_hit_tokens, "_hit"),
        ):
            if now > getattr(self, attr):  # counters advance by the change since last report
                counter.inc(now - getattr(self, attr), {**tags, **extra})
                setattr(self, attr, now)
