"""Prometheus metrics of one server, in a registry of its own (two apps in one process never share counters).

Engine state (requests running and waiting, KV blocks, prefix-cache hits) is read from `Engine.stats()` at scrape
time by a custom collector, so it can never go stale; latencies and token counts are observed by the app as
responses stream out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# CPU decoding runs at tens of milliseconds per token; queueing behind a full batch can take seconds.
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], object | None]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:  # still loading: report nothing rather than zeros that look like a healthy idle engine
            return
        yield GaugeMetricFamily("qwenkit_requests_running", "Requests in the running batch", value=s.running)
        yield GaugeMetricFamily("qwenkit_requests_waiting", "Requests queued for the batch", value=s.waiting)
        yield GaugeMetricFamily("qwenkit_kv_blocks_used", "KV cache blocks in use", value=s.kv_blocks_used)
        yield GaugeMetricFamily("qwenkit_kv_blocks_total", "KV cache blocks in the pool", value=s.kv_blocks_total)
        yield GaugeMetricFamily("qwenkit_kv_bytes_per_token", "KV cache bytes per token (keys and values of every "
                                "layer, in the cache's dtype)", value=s.kv_bytes_per_token)
        yield CounterMetricFamily(
            "qwenkit_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", value=s.prefix_cache_queries
        )
        yield CounterMetricFamily(
            "qwenkit_prefix_cache_hits", "Prompt tokens whose KV was reused from the prefix cache",
            value=s.prefix_cache_hits,
        )
        yield CounterMetricFamily("qwenkit_spec_draft_tokens", "Tokens guessed by speculative decoding (prompt "
                                  "lookup or draft model)", value=s.spec_proposed)
        yield CounterMetricFamily("qwenkit_spec_accepted_tokens", "Guessed tokens the model kept",
                                  value=s.spec_accepted)
        yield CounterMetricFamily("qwenkit_decode_passes", "Decode steps of one request (one model pass each)",
                                  value=s.decode_passes)
        yield CounterMetricFamily("qwenkit_decode_tokens", "Tokens the decode steps gave (divided by "
                                  "qwenkit_decode_passes: tokens per pass, above 1 with speculation)",
                                  value=s.decode_tokens)


class Metrics:
    def __init__(self, engine_stats: Callable[[], object | None]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_stats))
        r = self.registry
        self.ttft = Histogram("qwenkit_time_to_first_token_seconds", "Time from request to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("qwenkit_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qwenkit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qwenkit_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("qwenkit_requests_finished", "Generated sequences by finish reason",
                                ["finish_reason"], registry=r)
        self.http = Counter("qwenkit_http_requests", "HTTP requests by path and status", ["path", "status"],
                            registry=r)

    def observe_sequence(self, ttft: float | None, first: float, last: float, prompt_tokens: int,
                         completion_tokens: int, finish_reason: str) -> None:
        """One generated sequence ended: record its latencies (from stream timing) and token counts (from usage)."""
        if ttft is not None:
            self.ttft.observe(ttft)
        if completion_tokens > 1:
            self.tpot.observe((last - first) / (completion_tokens - 1))
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.finished.labels(finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
