"""Deployment settings of the reward server (pydantic-settings, env prefix ``FLOWRL_REWARD_``).

Every field can come from the environment, e.g.::

    FLOWRL_REWARD_REWARDS=brightness,toy_geneval          # names (or dotted paths), comma separated
    FLOWRL_REWARD_REWARDS='[{"name": "bright", "reward_model": "brightness", "target": 0.6}]'
    FLOWRL_REWARD_PORT=8000  FLOWRL_REWARD_MAX_BATCH_SIZE=32  FLOWRL_REWARD_MAX_QUEUE_DELAY_MS=5
    FLOWRL_API_TOKEN=...     (or FLOWRL_REWARD_TOKEN) requires ``Authorization: Bearer <token>``

The host defaults to ``127.0.0.1``: nothing listens beyond the loopback unless configured.
"""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.config import RewardEntry

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ServedReward(RewardEntry):
    """One served reward, shaped like an entry of the experiment's ``rewards:`` list (``name``
    is the v2 model name). Extra keys are the reward's own options (e.g. ``target`` for
    ``brightness``)."""

    batch_size: int | None = Field(None, gt=0)  # images per model call; None = max_batch_size
    device: str | None = None  # None = the server's device


def _parse_rewards(value: Any) -> Any:
    """``"a,b"`` or a JSON list (from the environment) -> list of entries."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"rewards looks like JSON but does not parse: {e}") from None
        value = [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [{"reward_model": v} if isinstance(v, str) else v for v in value]
    return value


class RewardServerSettings(BaseSettings):
    """Settings of ``flowrl serve reward`` (see the module docstring for the environment)."""

    model_config = SettingsConfigDict(env_prefix="FLOWRL_REWARD_", extra="forbid", populate_by_name=True)

    rewards: Annotated[list[ServedReward], NoDecode] = Field(..., min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "cpu"
    max_batch_size: int = Field(32, gt=0, description="samples merged into one scoring call")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="longest wait for more requests to merge")
    max_queue_size: int = Field(4096, gt=0, description="queued samples per model before 503")
    max_request_bytes: int = Field(64 * 2**20, gt=0, description="largest request body (after decompression)")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="largest decoded image (width x height)")
    token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("FLOWRL_REWARD_TOKEN", "FLOWRL_API_TOKEN")
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads of `flowrl serve reward`; None = half the CPUs (at least 1)")

    def intra_op_threads(self) -> int:
        """``torch_threads``, or half the CPUs this process may use (at least 1).

        Not all of them: the server decodes images, parses JSON and answers HTTP on other threads
        meanwhile, and an intra-op team that wants every core stalls whenever one of its threads
        is descheduled (measured with bench/reward_load.py on 2 CPUs: the tiny CLIP's batches took
        70-560 ms with 2 threads, 16-25 ms with 1)."""
        if self.torch_threads is not None:
            return self.torch_threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        return max(1, cpus // 2)

    @field_validator("rewards", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _parse_rewards(value)

    @field_validator("rewards")
    @classmethod
    def _unique_names(cls, value: list[ServedReward]) -> list[ServedReward]:
        seen: set[str] = set()
        for spec in value:
            label = spec.label
            if not MODEL_NAME.match(label):
                raise ValueError(
                    f"reward name {label!r} cannot be a v2 model name (letters, digits, '_', '.', '-'); "
                    f"give the entry a 'name'"
                )
            if label in seen:
                raise ValueError(f"reward name {label!r} is served twice; give each entry a unique 'name'")
            seen.add(label)
        return value

    @field_validator("token")
    @classmethod
    def _non_empty(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None
