"""Served models and their lifecycle: resolve at startup, load in the background, then batch.

Each reward is resolved in the registry when the app is created (a misspelt name fails at
once), built in a worker thread from the FastAPI lifespan (liveness answers meanwhile, and
readiness turns true once every model has loaded), then gets its own :class:`DynamicBatcher`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

from services.reward.batching import DynamicBatcher
from services.reward.errors import RequestError
from services.reward.metrics import Metrics
from services.reward.settings import RewardServerSettings, ServedReward
from shared.rewards import REWARDS, build_reward

log = logging.getLogger("flowrl.reward")


class Slot:
    """One served model: its spec, load state and batcher."""

    def __init__(self, spec: ServedReward) -> None:
        self.spec = spec
        self.name = spec.label
        self.kind: str = ""
        self.conditions = self.video = self.metadata = False
        cls = REWARDS.get(spec.reward_model)  # RegistryError names the choices
        # until the model is built: its class's flags, or the options of the same names it takes
        self.read_capabilities(SimpleNamespace(**{attr: cls.declared(attr, spec.options)
                                                  for attr in ("kind", "condition_images", "video", "metadata")}))
        self.state = "loading"  # loading | ready | failed
        self.error: str | None = None
        self.batcher: DynamicBatcher | None = None

    def read_capabilities(self, reward) -> None:
        """What requests must carry, from the reward's class at startup, then from the built model
        (whose options may set them: a served ``remote`` with ``condition_images`` / ``metadata`` /
        ``video`` of its own)."""
        self.kind = reward.kind
        self.conditions = bool(reward.condition_images)  # reads source images
        self.video = reward.video == "native"  # scores whole videos only
        self.metadata = bool(reward.metadata)  # reads dataset row metadata

    def ready_batcher(self) -> DynamicBatcher:
        """The batcher, or 503 saying why the model cannot score yet."""
        if self.batcher is not None:
            return self.batcher
        if self.state == "failed":
            raise RequestError(503, f"model '{self.name}' failed to load: {self.error}")
        raise RequestError(503, f"model '{self.name}' is still loading; retry shortly", {"Retry-After": "1"})


class Models:
    """All served models, in the order of ``settings.rewards`` (the first is ``/compute``'s)."""

    def __init__(self, settings: RewardServerSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.slots = {spec.label: Slot(spec) for spec in settings.rewards}
        self.default = next(iter(self.slots))
        for name in self.slots:
            metrics.model_ready.labels(name).set(0)

    def get(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise RequestError(404, f"unknown model '{name}'; this server serves: {', '.join(self.slots)}")
        return slot

    @property
    def ready(self) -> bool:
        return all(s.state == "ready" for s in self.slots.values())

    async def load_all(self) -> None:
        """Build every reward (in a thread) and start its batcher; failures are logged and kept."""
        for slot in self.slots.values():
            spec, start = slot.spec, time.perf_counter()
            try:
                model = await asyncio.to_thread(
                    build_reward, spec.reward_model, device=spec.device or self.settings.device,
                    dtype=spec.dtype, **spec.options)
            except Exception as e:
                slot.state, slot.error = "failed", f"{type(e).__name__}: {e}"
                log.error("reward '%s' failed to load: %s", slot.name, slot.error)
                continue
            slot.read_capabilities(model)
            s = self.settings
            slot.batcher = DynamicBatcher(
                slot.name, model, batch_size=spec.batch_size or s.max_batch_size, max_batch_size=s.max_batch_size,
                max_queue_delay_ms=s.max_queue_delay_ms, max_queue_size=s.max_queue_size, metrics=self.metrics)
            slot.batcher.start()
            slot.state = "ready"
            self.metrics.model_ready.labels(slot.name).set(1)
            log.info("reward '%s' (%s, %s) ready in %.2f s", slot.name, spec.reward_model, slot.kind,
                     time.perf_counter() - start)

    async def stop(self) -> None:
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.stop()
