"""``wan2_t2v``: Wan text-to-video (Wan2.1-T2V-1.3B/14B, Wan2.2-TI2V-5B) on diffusers' ``WanPipeline``.

Flow-matching RL on video, through the pipeline's own components and conventions:

* latents: video latents ``[C, F', H / f, W / f]`` per sample (``[B, C, F', h, w]`` a batch),
  ``F' = (F - 1) / t + 1`` latent frames for ``F`` frames (``t`` = the VAE's temporal factor,
  4 for Wan, so ``F = 4k + 1``: 1, 5, 9, ..., 81), normalized per channel as the pipeline does
  (``(z - latents_mean) / latents_std``); ``decode`` inverts that and returns frames
  ``[B, F, 3, H, W]`` in [0, 1] (the pipeline's ``output_type="pt"`` layout);
* frames: ``num_frames`` of a rollout = ``train.num_frames`` / ``eval.num_frames``, else
  ``model.options.num_frames`` (default 81, WanPipeline's default; RL on video usually trains
  at a few frames: Flow-Factory's Wan2.2 example uses 5);
* prompts: ``pipeline.encode_prompt`` (UMT5, zero-padded to ``max_sequence_length`` as the
  pipeline does, no mask); CFG with negative prompts (default: empty prompts) as WanPipeline
  does: two transformer calls, conditional then unconditional, ``v_u + w (v_c - v_u)`` for
  ``w > 1``;
* the denoiser: ``WanTransformer3DModel`` called with ``timestep = 1000 * sigma`` (float), velocity
  out (``v = eps - x0``); with the pipeline's ``expand_timesteps`` (Wan2.2-TI2V-5B) the timestep
  is given per latent token, as the pipeline does for text-to-video;
* sigma grid: the pipeline's own. WanPipeline calls ``scheduler.set_timesteps(N)``; flowrl takes
  that scheduler's sigmas (a fresh scheduler from the pipeline's config) and integrates them with
  its own Euler / SDE steps (as Flow-Factory does for Wan: rollouts are Euler, not UniPC).
  Wan's ``UniPCMultistepScheduler`` (``use_flow_sigmas``, ``flow_shift`` 3.0 for 480p, 5.0 for
  720p) starts at ``1 - 1e-6``; flowrl starts at exactly 1 (pure noise) and ends at exactly 0.
  ``scheduler_shift`` reports ``flow_shift``; ``model.scheduler_shift`` replaces the grid by
  ``flow_sigmas(N, shift)``. The pipeline feeds UniPC's timesteps as integers
  (``int(1000 sigma)``); flowrl feeds ``1000 sigma`` unrounded, the same as with
  ``FlowMatchEulerDiscreteScheduler``.

Wan2.2-A14B (``transformer_2`` with ``boundary_ratio`` in the pipeline config): the two experts are
one :class:`shared.models.experts.TwoExperts` module (``adapter.transformer``): the high-noise
``transformer`` takes ``1000 sigma >= boundary_ratio * num_train_timesteps``, ``transformer_2`` the
rest (the pipeline compares its integer UniPC timesteps; flowrl its unrounded ``1000 sigma``), each
with its CFG weight (``model.options.guidance_scale_2`` for the low-noise expert, default: the same
as ``guidance_scale``, as WanPipeline's ``guidance_scale_2``). LoRA trains both experts; a
checkpoint has ``lora/`` and ``lora_2/`` (``load_lora_weights(..., load_into_transformer_2=True)``).

Options (``model.options``): ``num_frames`` (default frames per video, 81), ``max_sequence_length``
(UMT5 tokens, default 512 like the pipeline's ``__call__``), ``text_dtype`` / ``vae_dtype``
(frozen parts' dtype, default float32 on CPU and bfloat16 on CUDA), ``guidance_scale_2`` (two-expert
pipelines only: the low-noise expert's CFG weight; ``None`` = ``train.guidance_scale``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.flow import flow_sigmas
from shared.models.base import MODELS, Conditioning, FlowModelAdapter
from shared.models.experts import TwoExperts, pipeline_denoiser
from shared.models.pipeline import DTYPE_OPTIONS, PipelineAdapter
from shared.models.prompt_length import MAX_SEQUENCE_FIX

WAN_OPTIONS: dict[str, Any] = {"num_frames": 81, "max_sequence_length": 512, "guidance_scale_2": None,
                               **DTYPE_OPTIONS}


def valid_frames_near(num_frames: int, factor: int) -> list[int]:
    """The frame counts ``factor * k + 1`` nearest to ``num_frames`` (one or two of them)."""
    below = max(1, (num_frames - 1) // factor * factor + 1)
    return sorted({below, below + factor} if below < num_frames else {below})


@MODELS.register("wan2_t2v")
class WanT2VAdapter(PipelineAdapter):
    model_type = "wan2_t2v"
    pipeline_class = "WanPipeline"
    option_defaults = WAN_OPTIONS
    hub_examples = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.2-TI2V-5B-Diffusers or "
                    "Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    text_encoders = ("text_encoder",)  # UMT5-XXL
    # videos are not encoded into training latents in this version: the base class raises
    encode_latents = FlowModelAdapter.encode_latents
    video = True
    # Flow-Factory's Wan targets: self- and cross-attention projections and the feed-forward
    default_lora_targets = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                            "ffn.net.0.proj", "ffn.net.2"]

    def __init__(self, pipeline, options: dict[str, Any]) -> None:
        denoiser = pipeline_denoiser(pipeline)  # the transformer, or both experts of Wan2.2-A14B
        if denoiser is None:
            raise ValueError(f"the {self.pipeline_class} folder has no transformer. Fix: point "
                             f"model.model_name_or_path at a complete Wan pipeline folder.")
        if options.get("guidance_scale_2") is not None and not isinstance(denoiser, TwoExperts):
            raise ValueError("model.options.guidance_scale_2 is the low-noise expert's CFG weight of a two-expert "
                             "Wan (Wan2.2-A14B); this pipeline has one transformer. Fix: remove the option.")
        super().__init__(pipeline, options)
        self.transformer = denoiser
        config = pipeline.scheduler.config
        self.scheduler_shift = float(config.get("flow_shift", config.get("shift", 1.0)))
        self.check_frames(int(options["num_frames"]), "model.options.num_frames")

    def prompt_token_limits(self) -> list:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return self.tokenizer_limits(("tokenizer", "UMT5", self.options["max_sequence_length"], MAX_SEQUENCE_FIX),
                                     render=prompt_clean)

    # ------------------------------------------------------------------ geometry
    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def temporal_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_temporal)

    def check_frames(self, num_frames: int, key: str) -> int:
        """``num_frames`` if it is ``t k + 1`` (``t`` = the VAE's temporal factor), else a ValueError
        that names ``key`` and the nearest valid counts."""
        t = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % t:
            near = " or ".join(str(n) for n in valid_frames_near(max(num_frames, 1), t))
            raise ValueError(
                f"{key}={num_frames} does not fit {self.model_type}: Wan's VAE compresses time by {t}, so a "
                f"video has {t}k + 1 frames (1, {t + 1}, {2 * t + 1}, ..., 81). Fix: set {key} to {near}.")
        return num_frames

    def sample_shape(self, resolution: tuple[int, int], num_frames: int | None = None) -> tuple[int, ...]:
        """``[C, F', H / f, W / f]`` for ``num_frames`` frames (``None``: ``options.num_frames``) of
        ``resolution = (H, W)`` pixels; ``F' = (num_frames - 1) / t + 1``."""
        if num_frames is None:
            frames = self.check_frames(int(self.options["num_frames"]), "model.options.num_frames")
        else:
            frames = self.check_frames(int(num_frames), "train.num_frames / eval.num_frames")
        patch = self.transformer.config.patch_size  # (frames, height, width): (1, 2, 2)
        h, w = self.latent_hw(resolution, int(patch[1]), f"patch size {patch[1]}")
        return (self.pipeline.vae.config.z_dim, (frames - 1) // self.temporal_factor + 1, h, w)

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        """:meth:`sample_shape` at the default ``options.num_frames``."""
        return self.sample_shape(resolution, None)

    def pipeline_sigmas(self, num_steps: int, resolution: int | tuple[int, int]) -> torch.Tensor:
        """The grid WanPipeline's ``__call__`` denoises on (``scheduler.set_timesteps(N)`` on a fresh
        scheduler from the pipeline's config; no resolution dependence): ``[N + 1]`` float32 on the
        CPU, its first sigma set to exactly 1 and its last to exactly 0."""
        scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(int(num_steps))
        sigmas = scheduler.sigmas.to(device="cpu", dtype=torch.float32).clone()
        if sigmas.numel() != num_steps + 1:
            raise ValueError(f"{type(scheduler).__name__} gave {sigmas.numel()} sigmas for {num_steps} steps; "
                             f"flowrl needs {num_steps + 1}. Fix: set model.scheduler_shift to use flowrl's grid.")
        sigmas[0], sigmas[-1] = 1.0, 0.0
        return sigmas

    def sigmas(self, num_steps: int, resolution: tuple[int, int]) -> torch.Tensor:
        """:meth:`pipeline_sigmas`, or ``flow_sigmas(N, shift)`` with ``model.scheduler_shift``."""
        if self.shift_override is not None:
            return flow_sigmas(num_steps, self.shift_override)
        return self.pipeline_sigmas(num_steps, resolution)

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        """``prompt_embeds [B, L, D]`` (``L = max_sequence_length``, zero-padded); with ``cfg`` also
        the negatives (default: empty prompts)."""
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        embeds, negative = self.encode_text(list(prompts), negatives if cfg else None)
        dtype = self.transformer.dtype
        return Conditioning({"prompt_embeds": embeds.to(dtype)},
                            {"prompt_embeds": negative.to(dtype)} if cfg else None)

    def encode_text(self, prompts: list[str], negatives: list[str] | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """UMT5 embeddings ``[B, L, D]`` of ``prompts`` and of ``negatives`` (``None``: no negative
        branch) as ``WanPipeline.encode_prompt``."""
        from diffusers import WanPipeline

        # WanPipeline's own function also for WanImageToVideoPipeline, whose copy of it calls ftfy
        # unconditionally (a NameError where ftfy is not installed); the code is otherwise the same
        def encode(texts: list[str]) -> torch.Tensor:
            return WanPipeline._get_t5_prompt_embeds(self.pipeline, prompt=texts, device=self.device,
                                                     max_sequence_length=int(self.options["max_sequence_length"]))

        return encode(prompts), None if negatives is None else encode(negatives)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance_scale: float, transformer: nn.Module | None = None) -> torch.Tensor:
        """WanPipeline's CFG: conditional, then unconditional forward, ``v_u + w (v_c - v_u)`` for
        ``w > 1`` with negatives; else the conditional velocity.

        Args:
            latents: ``[B, C, F', h, w]``; sigma: ``[B]``.
        Returns:
            float32 ``[B, C, F', h, w]``.
        """
        module = transformer if transformer is not None else self.transformer
        v = self.predict(module, latents, sigma, cond.tensors).float()
        if guidance_scale > 1.0 and cond.negative is not None:
            v_uncond = self.predict(module, latents, sigma, cond.negative).float()
            v = v_uncond + self.guidance_weights(sigma, guidance_scale) * (v - v_uncond)
        return v

    def guidance_weights(self, sigma: torch.Tensor, guidance_scale: float) -> float | torch.Tensor:
        """The CFG weight: ``guidance_scale``, or with two experts and ``options.guidance_scale_2``
        per sample ``[B, 1, 1, 1, 1]``: ``guidance_scale`` where the high-noise expert denoises,
        ``guidance_scale_2`` where the low-noise one does (WanPipeline's rule)."""
        low_scale = self.options.get("guidance_scale_2")
        if low_scale is None or not isinstance(self.transformer, TwoExperts):
            return guidance_scale
        high = self.transformer.high_noise(sigma.float() * 1000.0)
        w = torch.full(high.shape, float(low_scale), device=sigma.device).masked_fill(high, float(guidance_scale))
        return w.view(-1, 1, 1, 1, 1)

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``[B, C, F', h, w]`` for ``latents [B, C, F', h, w]`` at ``sigma [B]``."""
        timestep = sigma.float() * 1000.0  # what the pipeline passes (FlowMatchEuler's timesteps)
        if self.pipeline.config.get("expand_timesteps", False):  # one timestep per latent token
            b, _, f, h, w = latents.shape
            p = self.transformer.config.patch_size
            timestep = timestep[:, None].expand(b, (f // p[0]) * (h // p[1]) * (w // p[2]))
        return transformer(hidden_states=latents.to(self.transformer.dtype), timestep=timestep,
                           encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, F', h, w]`` normalized per channel -> frames ``[B, F, 3, H, W]`` in [0, 1]."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, torch.float32)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, torch.float32)
        video = vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0]  # [B, 3, F, H, W]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()
