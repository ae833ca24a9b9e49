"""Model adapters, one file per family, registered by ``model.model_type``."""

from shared.models.base import MODELS, Conditioning, FlowModelAdapter, ParamView

MODELS.register("tiny", "shared.models.tiny.TinyAdapter") if "tiny" not in MODELS else None


def load_adapter(model_cfg, *, device, seed: int) -> FlowModelAdapter:
    """Build the adapter named by ``model_cfg.model_type``."""
    return MODELS.get(model_cfg.model_type).load(model_cfg, device=device, seed=seed)


__all__ = ["MODELS", "Conditioning", "FlowModelAdapter", "ParamView", "load_adapter"]
