"""Prometheus metrics of the trainer (``metrics_port`` in the config serves them at ``/metrics``).

Names follow Prometheus practice (``flowrl_trainer_`` prefix, base units, ``_total`` counters).
Updated once per epoch from the same dict that goes to ``metrics.jsonl``:

* ``flowrl_trainer_policy_version``: versions published so far;
* ``flowrl_trainer_policy_lag`` / ``_lag_max``: how many versions the trained samples lagged;
* ``flowrl_trainer_epoch_seconds`` (histogram): wall time of one epoch (collect + optimize);
* ``flowrl_trainer_optimize_seconds`` (histogram): the optimization phase of one epoch, and
  ``flowrl_trainer_optimizer_steps_total``: seconds per train step =
  ``rate(flowrl_trainer_optimize_seconds_sum) / rate(flowrl_trainer_optimizer_steps_total)``;
* ``flowrl_trainer_loss``, ``flowrl_trainer_reward{reward=...}``: last epoch's means;
* ``flowrl_trainer_samples_total``, ``flowrl_trainer_duplicate_scores_total``,
  ``flowrl_trainer_dead_letters_total``;
* ``flowrl_queue_depth{queue=...}``: tasks waiting in the sample / reward queues (celery);
* ``flowrl_trainer_gpu_memory_bytes``: CUDA memory allocated by the trainer (0 without CUDA).
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

EPOCH_BUCKETS = (1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.version = Gauge("flowrl_trainer_policy_version", "Policy versions published.", registry=r)
        self.lag = Gauge("flowrl_trainer_policy_lag", "Mean policy-version lag of the trained samples.",
                         registry=r)
        self.lag_max = Gauge("flowrl_trainer_policy_lag_max", "Largest policy-version lag of the trained samples.",
                             registry=r)
        self.epoch_seconds = Histogram("flowrl_trainer_epoch_seconds", "Seconds per epoch (collect + optimize).",
                                       buckets=EPOCH_BUCKETS, registry=r)
        self.optimize_seconds = Histogram("flowrl_trainer_optimize_seconds",
                                          "Seconds per epoch spent in optimizer steps (forward, backward, update).",
                                          buckets=EPOCH_BUCKETS, registry=r)
        self.optimizer_steps = Counter("flowrl_trainer_optimizer_steps", "Optimizer steps taken.", registry=r)
        self.loss = Gauge("flowrl_trainer_loss", "Mean training loss of the last epoch.", registry=r)
        self.reward = Gauge("flowrl_trainer_reward", "Mean training reward of the last epoch.", ["reward"],
                            registry=r)
        self.samples = Counter("flowrl_trainer_samples", "Samples trained on.", registry=r)
        self.duplicates = Counter("flowrl_trainer_duplicate_scores", "Scores dropped because their sample id "
                                  "was already used (redelivered tasks).", registry=r)
        self.dead = Counter("flowrl_trainer_dead_letters", "Dead-lettered tasks the trainer has seen.", registry=r)
        self.queue_depth = Gauge("flowrl_queue_depth", "Tasks waiting in a queue.", ["queue"], registry=r)
        self.gpu_memory = Gauge("flowrl_trainer_gpu_memory_bytes", "CUDA memory allocated by the trainer.",
                                registry=r)
        self._counted = {"duplicates": 0, "dead": 0, "steps": 0}  # running totals already added

    def serve(self, host: str, port: int):
        """Serve ``/metrics`` from a background thread; returns the HTTP server."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server

    def observe_epoch(self, metrics: dict, samples: int, transport) -> None:
        """Update from one epoch's metrics dict (the ``metrics.jsonl`` row) and the transport."""
        self.version.set(metrics["train/policy_version"])
        self.lag.set(metrics.get("queue/policy_lag", 0.0))
        self.lag_max.set(metrics.get("queue/policy_lag_max", 0.0))
        self.epoch_seconds.observe(metrics["time/epoch_seconds"])
        self.optimize_seconds.observe(metrics["time/optimize_seconds"])
        self.optimizer_steps.inc(metrics["train/optimizer_step"] - self._counted["steps"])
        self._counted["steps"] = metrics["train/optimizer_step"]
        if "train/loss" in metrics:
            self.loss.set(metrics["train/loss"])
        for key, value in metrics.items():
            if key.startswith("train/reward/"):
                self.reward.labels(reward=key.removeprefix("train/reward/")).set(value)
        self.samples.inc(samples)
        # the run's duplicates: every trainer process's (queue/duplicates_total is summed over the
        # processes, collect.across_processes); dead letters are one list per run, read by each process
        duplicates = int(metrics.get("queue/duplicates_total", transport.duplicates))
        for name, counter, total in (("duplicates", self.duplicates, duplicates),
                                     ("dead", self.dead, transport.dead_letters_seen)):
            counter.inc(max(0, total - self._counted[name]))  # a counter never goes down
            self._counted[name] = max(total, self._counted[name])
        for queue, depth in transport.queue_depths().items():
            self.queue_depth.labels(queue=queue).set(depth)
        self.gpu_memory.set(torch.cuda.memory_allocated() if torch.cuda.is_available() else 0)
