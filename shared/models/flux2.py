"""``flux2`` and ``flux2-klein``: FLUX.2 [dev] (``Flux2Pipeline``) and FLUX.2 [klein]
(``Flux2KleinPipeline``), text to image.

The two pipelines share the transformer (``Flux2Transformer2DModel``), the VAE
(``AutoencoderKLFlux2``), the latent layout and the sigma schedule; they differ in the text encoder
and in guidance. Everything runs through the pipelines' own components and helpers:

* prompts: ``pipeline.encode_prompt`` -- hidden states of three text-encoder layers, stacked per
  token: ``prompt_embeds [B, max_sequence_length, 3 D]`` (padded to ``max_sequence_length``;
  the transformer gets no text mask, as in the pipelines). [dev]: Mistral-Small-3.1
  (``Mistral3ForConditionalGeneration``) on FLUX.2's system message + the prompt, layers
  (10, 20, 30); [klein]: Qwen3 (``Qwen3ForCausalLM``) on the chat-templated prompt, layers
  (9, 18, 27); ``options.text_encoder_out_layers`` overrides them;
* guidance: FLUX.2 [dev] is guidance-distilled. The scale is an *input* of the transformer
  (``guidance``, embedded like the timestep), one forward per step, no negative prompt:
  :meth:`Flux2Adapter.velocity` reads flowrl's ``guidance_scale`` as that embedded guidance (the
  pipeline's ``guidance_scale``, default 4.0). FLUX.2 [klein]-base has no guidance embedding
  (``guidance=None``) and uses real classifier-free guidance ``neg + w (pos - neg)`` with a
  negative prompt (the pipeline hard-codes ``""``; flowrl passes the dataset's
  ``negative_prompt``, else ``""``), CFG on for ``w > 1``. The step-distilled [klein] checkpoints
  (``is_distilled: true`` in ``model_index.json``) ignore guidance, as the pipeline does;
* the denoiser: ``timestep = sigma`` (the pipeline passes ``t / 1000`` with ``t = 1000 sigma``;
  the transformer multiplies by 1000 again, also the guidance) and velocity out
  (``v = eps - x0``, flowrl's convention, no sign flip);
* latents: flowrl keeps them spatial, ``[C, H / f, W / f]`` (``C`` = VAE latent channels, 32 in
  FLUX.2; ``f`` = VAE factor, 8), like ``flux1``. The pipeline's latents are 2x2-*patchified*
  (``_patchify_latents``: ``[4 C, H / 2f, W / 2f]``, channel index ``4 c + 2 dy + dx``) and
  *normalised with the VAE's batch-norm running statistics* over those ``4 C`` channels:
  ``(z_p - running_mean) / sqrt(running_var + batch_norm_eps)``. flowrl's latent is that
  normalised tensor unpatchified, so the two hold the same numbers in another order and the
  flow (``x_t = (1 - t) x0 + t eps``, elementwise) is the same. :meth:`predict` patchifies, packs
  the patches into tokens (``_pack_latents``: ``[B, HW / 4f^2, 4 C]``), builds the 4-D position
  ids like the pipeline (image ``(t=0, row, col, l=0)``, text ``(0, 0, 0, token)``) and unpacks
  the output; :meth:`decode` de-normalises, unpatchifies and runs the VAE.

Sigma grid: the pipelines shift ``linspace(1, 1/N, N)`` by ``mu = compute_empirical_mu(
image_seq_len, N)`` (BFL's fit: a function of the number of image tokens *and of the number of
steps*, not diffusers' ``calculate_shift``). Rollouts use exactly that grid for their own
resolution and step count (:meth:`Flux2BaseAdapter.pipeline_sigmas` via
:meth:`~shared.models.pipeline.PipelineAdapter.sigmas`). Setting ``model.scheduler_shift``
replaces it by flowrl's ``flow_sigmas(N, shift)``. ``scheduler_shift`` (the one-number summary
of the grid) is the pipeline's ``exp(mu)`` at ``options.shift_resolution`` (default 512) and
the pipelines' default 50 steps; :meth:`Flux2BaseAdapter.shift_for_resolution` gives it for any
resolution and step count.

Options (``model.options``): ``max_sequence_length`` (text tokens incl. the template, default 512
as the pipelines), ``text_encoder_out_layers`` (default: the pipeline's), ``shift_resolution``
(see above), ``text_dtype`` / ``vae_dtype`` (frozen parts' dtype, default float32 on CPU and
bfloat16 on CUDA).

Out of scope: image conditioning (FLUX.2's multi-reference editing). It would need the reference
images VAE-encoded like the targets (``_encode_vae_image``: patchify + the same batch-norm),
packed and appended to the image tokens with their own position ids (``_prepare_image_ids``:
``t = 10, 20, ...`` per reference), a ragged per-sample ``Conditioning`` entry for them (or a
batch of one), the velocity sliced back to the target tokens (``noise_pred[:, :N]``), and for
[dev] the optional caption up-sampling (``caption_upsample_temperature``: Mistral generates a new
prompt from prompt + images) done once at preprocessing, not per rollout.
"""

from __future__ import annotations

import importlib.util
import math
import operator
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from shared.models.base import MODELS, Conditioning
from shared.models.pipeline import DTYPE_OPTIONS, EmbeddedGuidance, PipelineAdapter
from shared.models.prompt_length import MAX_SEQUENCE_FIX, TokenLimit

FLUX2_OPTIONS: dict[str, Any] = {"max_sequence_length": 512, "text_encoder_out_layers": None,
                                 "shift_resolution": 512, **DTYPE_OPTIONS}
#: the step count of the one-number ``scheduler_shift`` summary: the pipelines' default
SUMMARY_STEPS = 50


class Flux2BaseAdapter(PipelineAdapter):
    """What ``flux2`` and ``flux2-klein`` share: loading, the sigma grid, latents, the denoiser
    call, decoding. Subclasses add ``encode_prompts`` (and [dev] its guidance)."""

    option_defaults = FLUX2_OPTIONS
    pipeline_grid = True
    #: the pipeline's default ``text_encoder_out_layers``
    default_text_encoder_out_layers: ClassVar[tuple[int, ...]]
    # Flow-Factory's FLUX.2 targets: attention and feed-forwards of the double-stream blocks and the
    # single-stream blocks' fused QKV+MLP input projection. (Its list also has "attn.to_out.0" for
    # the single blocks, whose fused output projection is "attn.to_out", a plain Linear; the name
    # "attn.to_out" also names the double blocks' ModuleList, which peft cannot wrap, so it is not
    # a default target.)
    default_lora_targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                            "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                            "attn.to_qkv_mlp_proj"]

    def __init__(self, pipeline, options: dict[str, Any]) -> None:
        super().__init__(pipeline, options)
        self.text_encoder_out_layers = self._check_text_layers(options["text_encoder_out_layers"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int, **kwargs: Any) -> "Flux2BaseAdapter":
        """:meth:`PipelineAdapter.load`, after checking that a PixtralProcessor tokenizer (FLUX.2
        [dev]) can be built: without torchvision diffusers only says that a "Placeholder"
        component cannot be loaded."""
        import diffusers

        path = cls.check_source(model_cfg)
        tokenizer = getattr(diffusers, cls.pipeline_class).load_config(path).get("tokenizer", [None, None])
        if tokenizer[1] == "PixtralProcessor" and importlib.util.find_spec("torchvision") is None:
            raise ImportError(
                f"{path!r}: the pipeline's tokenizer is a PixtralProcessor (FLUX.2 [dev]'s Mistral-3 "
                f"processor), which transformers only builds with torchvision installed, and it is not. "
                f"Fix: install the torchvision build that matches your torch (pip install torchvision).")
        return super().load(model_cfg, device=device, seed=seed, **kwargs)  # type: ignore[return-value]

    def _check_text_layers(self, layers: list[int] | None) -> tuple[int, ...]:
        layers = tuple(int(i) for i in layers) if layers is not None else self.default_text_encoder_out_layers
        n = self.pipeline.text_encoder.config.get_text_config().num_hidden_layers
        if not layers or any(not 0 <= i <= n for i in layers):
            raise ValueError(
                f"model.options.text_encoder_out_layers={list(layers)}: the text encoder has {n} layers, "
                f"so its hidden states are numbered 0..{n}. Fix: list layers in that range (the "
                f"pipeline's default is {list(self.default_text_encoder_out_layers)}); the transformer "
                f"expects len(layers) x hidden size = joint_attention_dim "
                f"({self.transformer.config.joint_attention_dim}) features per token.")
        return layers

    # ------------------------------------------------------------------ sigma grid
    def empirical_mu(self, resolution: int | tuple[int, int], num_steps: int) -> float:
        """The pipelines' ``mu``: ``compute_empirical_mu(image_seq_len, num_steps)`` (BFL's fit),
        with one image token per 2x2 latent patch, ``(H / 2f) (W / 2f)``."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        step = 2 * self.vae_scale_factor
        return compute_empirical_mu(image_seq_len=(h // step) * (w // step), num_steps=num_steps)

    def shift_for_resolution(self, resolution: int | tuple[int, int], num_steps: int = SUMMARY_STEPS) -> float:
        """The SD3-style shift equal to the pipeline's grid at ``resolution`` and ``num_steps``.

        With ``use_dynamic_shifting`` (FLUX.2's scheduler config): ``exp(mu)`` for the exponential
        time shift, ``mu`` for the linear one (:meth:`empirical_mu`). Otherwise the static ``shift``.
        """
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        mu = self.empirical_mu(resolution, num_steps)
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

    def pipeline_sigmas(self, num_steps: int, resolution: int | tuple[int, int]) -> torch.Tensor:
        """The grid the pipeline's own ``__call__`` denoises on: ``[N + 1]`` float32 on the CPU.

        As :meth:`PipelineAdapter.pipeline_sigmas` (a fresh scheduler from the pipeline's config, set
        like ``__call__`` does), with FLUX.2's ``mu`` (:meth:`empirical_mu`, which also depends on N).
        """
        num_steps = operator.index(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(sigmas=self.base_sigmas(num_steps), mu=self.empirical_mu(resolution, num_steps))
        return scheduler.sigmas.to(device="cpu", dtype=torch.float32)

    # ------------------------------------------------------------------ latents
    def _patch_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE batch norm's mean and std, ``[1, 4 C, 1, 1]`` each (patchified channels)."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean, std

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """``prompt_embeds [B, max_sequence_length, len(layers) x D]`` in the transformer's dtype."""
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device,
            max_sequence_length=int(self.options["max_sequence_length"]),
            text_encoder_out_layers=self.text_encoder_out_layers)
        return prompt_embeds.to(self.transformer.dtype)

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        """``[C, H / f, W / f]`` spatial (``C`` = VAE latent channels, a quarter of the transformer's
        patchified input channels)."""
        return self.packed_latent_shape(resolution)

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` for spatial ``latents [B, C, H, W]`` at ``sigma [B]``.

        ``cond``: ``prompt_embeds [B, L, D_joint]`` and, for [dev], ``guidance [B]``.
        """
        b, c, h, w = latents.shape
        dtype, device = self.transformer.dtype, latents.device
        patches = self.pipeline._patchify_latents(latents)  # [B, 4C, H/2, W/2]
        packed = self.pipeline._pack_latents(patches).to(dtype)  # [B, HW/4, 4C]
        img_ids = self.pipeline._prepare_latent_ids(patches).to(device)  # [B, HW/4, 4]: (0, row, col, 0)
        txt_ids = self.pipeline._prepare_text_ids(cond["prompt_embeds"]).to(device)  # [B, L, 4]: (0, 0, 0, l)
        timestep = (sigma * 1000.0).to(dtype) / 1000  # exactly what the pipelines pass
        out = transformer(
            hidden_states=packed, timestep=timestep, guidance=cond.get("guidance"),
            encoder_hidden_states=cond["prompt_embeds"], txt_ids=txt_ids, img_ids=img_ids,
            return_dict=False)[0]  # [B, HW/4, 4C]
        out = out.transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2)  # inverse of _pack_latents
        return self.pipeline._unpatchify_latents(out)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> spatial latents normalized by the VAE batch norm in
        patchified space (the VAE posterior mean): what :meth:`decode` inverts."""
        vae = self.pipeline.vae
        mean, std = self._patch_stats()
        z = vae.encode((images * 2 - 1).to(self.device, vae.dtype)).latent_dist.mean.float()
        patches = self.pipeline._patchify_latents(z)
        return self.pipeline._unpatchify_latents((patches - mean.float()) / std.float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised spatial latents ``[B, C, H / f, W / f]`` -> images ``[B, 3, H, W]`` in [0, 1]:
        patchify, undo the batch norm, unpatchify, VAE decode (the pipelines' order)."""
        vae = self.pipeline.vae
        mean, std = self._patch_stats()
        patches = self.pipeline._patchify_latents(latents.float())
        z = self.pipeline._unpatchify_latents(patches * std.float() + mean.float())  # raw VAE latents
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


@MODELS.register("flux2")
class Flux2Adapter(EmbeddedGuidance, Flux2BaseAdapter):
    """FLUX.2 [dev]: Mistral-3 prompts, guidance-distilled (embedded guidance, no negatives)."""

    model_type = "flux2"
    pipeline_class = "Flux2Pipeline"
    hub_examples = "black-forest-labs/FLUX.2-dev"
    default_text_encoder_out_layers = (10, 20, 30)

    def prompt_token_limits(self) -> list:
        """Counted as Flux2Pipeline tokenizes: the system message and the prompt through the
        Mistral-3 chat template, truncated at ``max_sequence_length``."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        tokenizer = self.pipeline.tokenizer
        if tokenizer is None:
            return []

        def count(prompt: str) -> int:
            ids = tokenizer.apply_chat_template(
                format_input([prompt], system_message=self.pipeline.system_message), add_generation_prompt=False,
                tokenize=True, return_dict=True, truncation=False)["input_ids"]
            return len(ids[0]) if ids and isinstance(ids[0], list) else len(ids)

        return [TokenLimit("Mistral-3 (tokenizer)", int(self.options["max_sequence_length"]), count, MAX_SEQUENCE_FIX)]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        """``prompt_embeds [B, L, 3 D]``. Guidance-distilled: ``cfg`` and ``negative_prompts`` are
        ignored (no negative branch, see :meth:`velocity`)."""
        return Conditioning({"prompt_embeds": self._encode(prompts)})


@MODELS.register("flux2-klein")
class Flux2KleinAdapter(Flux2BaseAdapter):
    """FLUX.2 [klein] (-base): Qwen3 prompts, classifier-free guidance with negative prompts
    (the base class's :meth:`velocity`). Step-distilled checkpoints run without guidance."""

    model_type = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    hub_examples = "black-forest-labs/FLUX.2-klein-base-4B or -9B"
    default_text_encoder_out_layers = (9, 18, 27)

    def prompt_token_limits(self) -> list:
        """Counted as Flux2KleinPipeline tokenizes: the Qwen3 chat template (thinking off, the
        generation prompt added), truncated at ``max_sequence_length``."""
        def render(prompt: str) -> str:
            return self.pipeline.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                enable_thinking=False)

        return self.tokenizer_limits(("tokenizer", "Qwen3", self.options["max_sequence_length"], MAX_SEQUENCE_FIX),
                                     render=render)

    @property
    def is_distilled(self) -> bool:
        """``model_index.json``'s ``is_distilled``: step-distilled [klein] ignores guidance."""
        return bool(self.pipeline.config.get("is_distilled", False))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        """``prompt_embeds [B, L, 3 D]``; with ``cfg`` also the negatives (``""`` when none are
        given), except for step-distilled checkpoints, which ignore guidance like the pipeline."""
        cond = Conditioning({"prompt_embeds": self._encode(prompts)})
        if cfg and self.is_distilled:
            warnings.warn(f"{self.model_type}: this checkpoint is step-distilled (is_distilled=True); "
                          f"guidance_scale > 1 is ignored, as in Flux2KleinPipeline. Use a -base "
                          f"checkpoint for classifier-free guidance.", stacklevel=2)
        elif cfg:
            negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; "
                                 f"give one per prompt ('' for none).")
            cond.negative = {"prompt_embeds": self._encode(negatives)}
        return cond
