"""Settings of ``flowrl serve sampler`` (pydantic-settings, env prefix ``FLOWRL_SAMPLER_``), e.g.::

    FLOWRL_SAMPLER_CONFIG=examples/toy/nft_10min.yaml
    FLOWRL_SAMPLER_CHECKPOINT=runs/toy_nft_10min/checkpoints/final
    FLOWRL_SAMPLER_PORT=8001  FLOWRL_SAMPLER_DEVICE=cuda
    FLOWRL_API_TOKEN=...     (or FLOWRL_SAMPLER_TOKEN) requires ``Authorization: Bearer <token>``

The host defaults to ``127.0.0.1``: nothing listens beyond the loopback unless configured.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SamplerServerSettings(BaseSettings):
    """Settings of ``flowrl serve sampler`` (see :mod:`services.sampler.server`)."""

    model_config = SettingsConfigDict(env_prefix="FLOWRL_SAMPLER_", extra="forbid", populate_by_name=True)

    config: str  # the experiment YAML whose model: (and eval: defaults) to serve
    overrides: list[str] = Field(default_factory=list)  # key=value, as flowrl train's --set
    # a flowrl checkpoint folder, or "latest" (the run's newest checkpoint, final or checkpoint-N,
    # when the server starts); None or "" = the base (model.init_from included)
    checkpoint: str | None = None
    live: bool = False  # the checkpoint's live weights instead of its EMA (what evaluation scores)
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    device: str = "cpu"
    batch_size: int | None = Field(None, gt=0, description="images per model call; None = eval.per_device_batch_size")
    max_images_per_request: int = Field(64, gt=0)
    token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("FLOWRL_SAMPLER_TOKEN", "FLOWRL_API_TOKEN"))
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("checkpoint")
    @classmethod
    def _empty_is_base(cls, value: str | None) -> str | None:
        return value or None  # FLOWRL_SAMPLER_CHECKPOINT= (set but empty, as compose passes it): the base
