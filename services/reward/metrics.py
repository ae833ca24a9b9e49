"""Prometheus metrics of the reward server, in a registry of its own per app.

Names follow Prometheus practice (``flowrl_`` prefix, base units, ``_total`` counters); the
``model`` label takes only served model names, so its cardinality is the number of rewards.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric the server exports; ``registry`` is what ``/metrics`` serves."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "flowrl_reward_requests", "Scoring requests by model, protocol (v2 or compute) and HTTP status code.",
            ["model", "protocol", "code"], registry=r)
        self.request_seconds = Histogram(
            "flowrl_reward_request_seconds", "Scoring request latency from arrival to response.",
            ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "flowrl_reward_queue_seconds", "Time a request waited in the batching queue.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_seconds = Histogram(
            "flowrl_reward_model_seconds", "Time the reward model took per merged batch.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "flowrl_reward_batch_size", "Samples per merged batch (server-side dynamic batching).",
            ["model"], buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "flowrl_reward_batch_requests", "Requests merged into one batch.",
            ["model"], buckets=SIZE_BUCKETS, registry=r)
        self.samples = Counter(
            "flowrl_reward_samples", "Samples scored.", ["model"], registry=r)
        self.queue_samples = Gauge(
            "flowrl_reward_queue_samples", "Samples waiting to be batched.", ["model"], registry=r)
        self.model_ready = Gauge(
            "flowrl_reward_model_ready", "1 once the model has loaded, else 0.", ["model"], registry=r)
