"""Tiny random-weight image-to-video pipelines, offline: ``wan2_i2v`` on ``WanImageToVideoPipeline``.

Two variants of Wan's first-frame conditioning, on the parts of
:func:`tests.helpers.tiny_pipelines.build_wan_t2v` (UMT5, 4x/4x Wan VAE, UniPC or Euler scheduler):

* Wan2.1-I2V (:func:`build_wan_i2v`): the condition video's latents and the first-frame mask are
  concatenated to the latents on the channel axis (``in_channels = 2 z + 4``), and a tiny
  ``CLIPVisionModel`` (with a ``CLIPImageProcessor``, PIL backend) gives image embeddings the
  transformer cross-attends to (``image_dim``, ``added_kv_proj_dim``);
* Wan2.2-TI2V (``ti2v=True``): ``expand_timesteps``: the first latent frame is replaced by the
  condition image's latents and gets timestep 0; no image encoder;
* Wan2.2-I2V-A14B (:func:`build_wan_i2v_a14b`): Wan2.1-I2V's channel-axis conditioning without an
  image encoder, on two experts (``transformer_2`` below ``boundary_ratio``).
"""

from __future__ import annotations

import torch


def build_wan_i2v(seed: int = 0, *, euler: bool = False, ti2v: bool = False):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from tests.helpers.tiny_pipelines import build_wan_t2v

    t2v = build_wan_t2v(seed, euler=euler)
    torch.manual_seed(seed + 1)
    z = t2v.vae.config.z_dim
    image_encoder = image_processor = None
    if ti2v:
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z, out_channels=z,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    else:
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=16)).eval()
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=2 * z + t2v.vae.config.scale_factor_temporal, out_channels=z, text_dim=16, freq_dim=32,
            ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=16, added_kv_proj_dim=24)
    pipe = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, image_processor=image_processor,
                                   image_encoder=image_encoder, transformer=transformer, expand_timesteps=ti2v)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_wan_i2v_a14b(seed: int = 0, *, boundary_ratio: float = 0.5):
    """Wan2.2-I2V-A14B's layout: two differently initialised experts taking ``[latents; mask;
    condition latents]`` (``in_channels = 2 z + 4``), no image encoder, and ``boundary_ratio`` (0.5
    here, so the generic tests' grids straddle it; the real checkpoint has 0.9)."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from tests.helpers.tiny_pipelines import build_wan_t2v

    t2v = build_wan_t2v(seed)
    z = t2v.vae.config.z_dim

    def expert(offset: int):
        torch.manual_seed(seed + offset)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=2 * z + t2v.vae.config.scale_factor_temporal, out_channels=z, text_dim=16, freq_dim=32,
            ffn_dim=32, num_layers=2, rope_max_seq_len=32)

    pipe = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   scheduler=t2v.scheduler, image_processor=None, image_encoder=None,
                                   transformer=expert(1), transformer_2=expert(7), boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe
