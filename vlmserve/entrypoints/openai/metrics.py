"""Prometheus metrics of the server, updated from the engine thread after each step."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # keep /metrics to the series people graph

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.requests = Counter("vlmserve:request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("vlmserve:prompt_tokens", "Prompt tokens of finished requests", labels, registry=r)
        self.generation_tokens = Counter("vlmserve:generation_tokens", "Generated tokens", labels, registry=r)
        self.ttft = Histogram("vlmserve:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vlmserve:time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_usage = Gauge("vlmserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use", labels, registry=r)
        self.running = Gauge("vlmserve:num_requests_running", "Sequences running", labels, registry=r)
        self.waiting = Gauge("vlmserve:num_requests_waiting", "Sequences waiting (queue length)", labels, registry=r)
        self.batch_size = Histogram("vlmserve:step_batch_size", "Sequences per engine step", labels,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.max_batch = Gauge("vlmserve:max_step_batch_size", "Most sequences in one engine step so far",
                               labels, registry=r)
        self.labels = {"model_name": model_name}

    def _set_gauges(self, engine) -> None:
        lb = self.labels
        self.kv_usage.labels(**lb).set(engine.block_manager.usage)
        self.running.labels(**lb).set(len(engine.scheduler.running))
        self.waiting.labels(**lb).set(engine.scheduler.num_waiting)
        self.max_batch.labels(**lb).set(engine.stats.max_batch_seqs)

    def on_step(self, engine, outputs, step_seconds: float) -> None:
        lb = self.labels
        self._set_gauges(engine)
        if engine.stats.batch_sizes:
            self.batch_size.labels(**lb).observe(engine.stats.batch_sizes[-1])
        now = time.monotonic()
        for out in outputs:
            if not out.finished:
                continue
            arrival = out.metrics.get("arrival_time")
            first = out.metrics.get("first_token_time")
            n_out = sum(len(c.token_ids) for c in out.outputs)
            self.prompt_tokens.labels(**lb).inc(len(out.prompt_token_ids))
            self.generation_tokens.labels(**lb).inc(n_out)
            for c in out.outputs:
                self.requests.labels(finished_reason=c.finish_reason or "abort", **lb).inc()
            if arrival is not None and first is not None:
                self.ttft.labels(**lb).observe(first - arrival)
                per_seq = max(len(out.outputs[0].token_ids) - 1, 0)
                if per_seq:
                    self.tpot.labels(**lb).observe((now - first) / per_seq)

    def render(self, engine) -> bytes:
        self._set_gauges(engine)  # also fresh when no step has run since requests left
        return generate_latest(self.registry)
