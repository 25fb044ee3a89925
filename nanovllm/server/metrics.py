"""Prometheus metrics under vLLM's names, and the one log line per request.

Gauges and counters come from the engine's ``stats()`` snapshot at scrape time (the engine
thread refreshes it after every step); latency histograms are observed by the HTTP side as each
request ends. Each server gets its own registry, so several can live in one process (tests).
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("nanovllm.server")
disable_created_metrics()  # no *_created samples (vLLM has none)

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)


class _EngineCollector:
    def __init__(self, get_stats: Callable[[], Any], model_name: str):
        self.get_stats, self.labels = get_stats, [model_name]

    def collect(self):
        s = self.get_stats()
        for name, doc, value in (
            ("vllm:num_requests_running", "Sequences in the running batch.", s.num_running),
            ("vllm:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("vllm:kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).", s.kv_cache_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(self.labels, value)
            yield g
        for name, doc, value in (
            ("vllm:prompt_tokens", "Prompt tokens admitted.", s.num_prompt_tokens),
            ("vllm:generation_tokens", "Tokens generated.", s.num_generation_tokens),
            ("vllm:num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(self.labels, value)
            yield c


class ServerMetrics:
    def __init__(self, get_stats: Callable[[], Any], model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(get_stats, model_name))

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = hist(
            "vllm:time_per_output_token_seconds", "Mean time per output token.", _LATENCY_BUCKETS
        )
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Request latency, end to end.", _E2E_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time before the first step.", _E2E_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestLog:
    """Timing of one request, observed into the histograms and logged once when it ends."""

    def __init__(self, metrics: ServerMetrics, request_id: str, num_prompt_tokens: int, prompt: Any = None):
        self.metrics, self.request_id = metrics, request_id
        self.num_prompt_tokens, self.prompt = num_prompt_tokens, prompt
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.num_completion_tokens = 0

    def on_output(self, out: Any) -> None:
        new = sum(len(c.new_token_ids or ()) for c in out.outputs)
        if new and self.first_token is None:
            self.first_token = time.monotonic()
        self.num_completion_tokens += new

    def finish(self, status: str, first_scheduled: float | None = None) -> None:
        end = time.monotonic()
        labels = (self.metrics.model_name,)
        ttft = None if self.first_token is None else self.first_token - self.start
        if status == "ok":
            self.metrics.e2e.labels(*labels).observe(end - self.start)
            if ttft is not None:
                self.metrics.ttft.labels(*labels).observe(ttft)
            if self.num_completion_tokens > 1 and ttft is not None:
                tpot = (end - self.first_token) / (self.num_completion_tokens - 1)
                self.metrics.tpot.labels(*labels).observe(tpot)
            if first_scheduled is not None:
                self.metrics.queue.labels(*labels).observe(max(0.0, first_scheduled - self.start))
        logger.info(
            "request %s status=%s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs%s",
            self.request_id,
            status,
            self.num_prompt_tokens,
            self.num_completion_tokens,
            "-" if ttft is None else f"{ttft:.3f}s",
            end - self.start,
            "" if self.prompt is None else f" prompt={self.prompt!r}",
        )
