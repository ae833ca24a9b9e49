"""Model adapters, one file per family, registered by ``model.model_type``."""

import torch

from shared.models.base import MODELS, Conditioning, FlowModelAdapter, ParamView

for _name, _path in (("tiny", "shared.models.tiny.TinyAdapter"),
                     ("sd3-5", "shared.models.sd3.SD3Adapter"),
                     ("flux1", "shared.models.flux1.Flux1Adapter"),
                     ("z-image", "shared.models.z_image.ZImageAdapter"),
                     ("qwen-image", "shared.models.qwen_image.QwenImageAdapter"),
                     ("flux2", "shared.models.flux2.Flux2Adapter"),
                     ("flux2-klein", "shared.models.flux2.Flux2KleinAdapter"),
                     ("flux1-kontext", "shared.models.flux1_kontext.Flux1KontextAdapter"),
                     ("qwen-image-edit-plus", "shared.models.qwen_image_edit.QwenImageEditPlusAdapter"),
                     ("wan2_t2v", "shared.models.wan.WanT2VAdapter"),
                     ("wan2_i2v", "shared.models.wan_i2v.WanI2VAdapter")):
    if _name not in MODELS:
        MODELS.register(_name, _path)


def load_adapter(model_cfg, *, device, seed: int, transformer_device=None) -> FlowModelAdapter:
    """Build the adapter named by ``model_cfg.model_type``, with its embedding cache
    (``model.embedding_cache_mb`` / ``embedding_cache_dir`` / ``offload_text_encoders``,
    :mod:`shared.embedding_cache`) and ``source_path`` (the model folder the cache fingerprints).
    ``transformer_device``: where the transformer stays instead of ``device`` (``train.fsdp`` keeps
    it on the CPU, and sharding moves each process's pieces to its GPU)."""
    from shared.embedding_cache import EmbeddingCache

    extra = {} if transformer_device is None else {"transformer_device": torch.device(transformer_device)}
    adapter = MODELS.get(model_cfg.model_type).load(model_cfg, device=device, seed=seed, **extra)
    if getattr(adapter, "source_path", None) is None:
        adapter.source_path = getattr(model_cfg, "model_name_or_path", None)
    adapter.embedding_cache = EmbeddingCache.from_config(model_cfg)
    return adapter


__all__ = ["MODELS", "Conditioning", "FlowModelAdapter", "ParamView", "load_adapter"]
