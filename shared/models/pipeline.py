"""The shared base of adapters that wrap one diffusers pipeline: :class:`PipelineAdapter`.

``sd3-5``, ``flux1``, ``z-image`` and ``qwen-image`` load and place their pipeline the same way;
a family's file keeps only what is its own (``encode_prompts``, ``latent_shape``, ``predict``,
``decode``, guidance) and describes itself with class attributes:

* ``pipeline_class``: the diffusers class name (``"FluxPipeline"``), imported on first load;
* ``option_defaults``: every valid ``model.options`` key with its default. Include
  :data:`DTYPE_OPTIONS` (``text_dtype`` / ``vae_dtype``: the frozen parts' dtype, default float32
  on CPU and bfloat16 on CUDA; ``transformer_dtype``: the denoiser's, default as loaded, i.e.
  float32) and, with ``pipeline_grid``, ``shift_resolution``;
* ``hub_examples`` (and optionally ``local_example``): what the missing-path error suggests;
* ``text_encoders``: the pipeline's text-encoder attributes. They and the ``vae`` are frozen
  (``requires_grad_(False).eval()``) and cast to their dtype option; absent ones (``None``) are
  skipped;
* ``pipeline_grid``: ``True`` when rollouts should use the pipeline's own sigma grid for the
  actual resolution (:meth:`PipelineAdapter.pipeline_sigmas`); ``False`` keeps flowrl's grid
  ``flow_sigmas(N, scheduler_shift)`` on the scheduler's static ``shift``;
* ``folder_defaults``: ``True`` when a pipeline folder may carry a ``flowrl.json`` with option
  defaults (explicit ``model.options`` win; :meth:`PipelineAdapter.save_pretrained` writes the
  options that differ from the defaults there).

Loading (:meth:`PipelineAdapter.load`): check the path and the options (errors name the fix),
``from_pretrained`` (components saved as ``None`` are passed as ``None``), then
:meth:`PipelineAdapter.from_pipeline` (device, dtypes, progress bar off, frozen parts) and the
``model.scheduler_shift`` override.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from shared.flow import resolution_shift_mu
from shared.models.base import FlowModelAdapter
from shared.models.prompt_length import TokenLimit, tokens

#: the options every pipeline family has: the frozen parts' dtypes (None = by device), and the
#: denoiser's (None = as ``from_pretrained`` loads it: float32). ``transformer_dtype: bfloat16``
#: halves a LoRA run's frozen weights (trained weights stay in ``model.master_weight_dtype``), as
#: Flow-Factory keeps frozen weights in the ``mixed_precision`` dtype
DTYPE_OPTIONS: dict[str, Any] = {"text_dtype": None, "vae_dtype": None, "transformer_dtype": None}
TRANSFORMER_DTYPES = ("float32", "bfloat16", "float16")
#: the file in a pipeline folder with option defaults (families with ``folder_defaults``)
FOLDER_DEFAULTS = "flowrl.json"


def component_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A ``text_dtype`` / ``vae_dtype`` option as a dtype: ``None`` is bfloat16 on CUDA, else float32."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def read_folder_defaults(path: str | Path) -> dict[str, Any]:
    """``flowrl.json`` in a local pipeline folder (empty for hub ids and folders without one)."""
    file = Path(path) / FOLDER_DEFAULTS
    return json.loads(file.read_text()) if file.is_file() else {}



def _pair(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)  # type: ignore[return-value]


class PipelineAdapter(FlowModelAdapter):
    """A :class:`FlowModelAdapter` over one diffusers pipeline (see the module docstring).

    Attributes: ``pipeline`` (the diffusers pipeline), ``transformer`` (its denoiser, the trainable
    part), ``options`` (``model.options`` over :attr:`option_defaults`), ``shift_override`` (the
    ``model.scheduler_shift`` it was loaded with, or ``None``).
    """

    pipeline_class: ClassVar[str]  # diffusers class name, e.g. "FluxPipeline"
    option_defaults: ClassVar[dict[str, Any]]  # every valid model.options key -> default
    hub_examples: ClassVar[str]  # hub ids the missing-path error suggests
    local_example: ClassVar[str | None] = None  # a local folder it suggests too
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # frozen, cast to text_dtype
    pipeline_grid: ClassVar[bool] = False  # rollouts on the pipeline's own sigma grid
    folder_defaults: ClassVar[bool] = False  # read/write option defaults in flowrl.json

    def __init__(self, pipeline, options: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.options = options
        self.shift_override: float | None = None
        for name in self.frozen_components():
            module = getattr(pipeline, name)
            if module is not None:
                module.requires_grad_(False).eval()
        if self.pipeline_grid:
            self.scheduler_shift = self.shift_for_resolution(options["shift_resolution"])
        else:
            self.scheduler_shift = float(pipeline.scheduler.config.get("shift", 1.0))

    # ------------------------------------------------------------------ loading
    @classmethod
    def frozen_components(cls) -> dict[str, str]:
        """Pipeline attribute -> the option holding its dtype (text encoders and the VAE)."""
        return {**{name: "text_dtype" for name in cls.text_encoders}, "vae": "vae_dtype"}

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Reject option values the family cannot run with (``options`` has every key)."""

    @classmethod
    def skipped_components(cls, options: dict[str, Any]) -> list[str]:
        """Pipeline components not to load at all under ``options`` (passed as ``None``)."""
        return []

    @classmethod
    def preloaded_components(cls, path: str, options: dict[str, Any]) -> dict[str, Any]:
        """Components the family builds itself from ``path`` and hands to ``from_pretrained``
        (name -> object; e.g. a processor transformers cannot load here)."""
        return {}

    @classmethod
    def from_pipeline(cls, pipeline, options: dict[str, Any] | None = None,
                      device: torch.device | str = "cpu",
                      transformer_device: torch.device | str | None = None) -> "PipelineAdapter":
        """Wrap an already built pipeline of :attr:`pipeline_class` (tests, scripts): ``options``
        over :attr:`option_defaults`, everything on ``device`` (the denoiser(s) on
        ``transformer_device`` when given), the frozen parts in their dtype, the progress bar off."""
        o = {**cls.option_defaults, **(options or {})}
        cls.validate_options(o)
        if o.get("transformer_dtype") not in (None, *TRANSFORMER_DTYPES):
            raise ValueError(f"model.options.transformer_dtype={o['transformer_dtype']!r} is not a dtype flowrl "
                             f"runs a denoiser in. Fix: one of {', '.join(TRANSFORMER_DTYPES)}, or null (as loaded).")
        device = torch.device(device)
        if transformer_device is None:
            pipeline.to(device)
        else:  # the whole transformer never reaches `device` (train.fsdp shards it there)
            for name, module in pipeline.components.items():
                if isinstance(module, torch.nn.Module):
                    module.to(transformer_device if name in ("transformer", "transformer_2") else device)
        if o.get("transformer_dtype"):  # both experts of Wan2.2-A14B (load() reads them in it already)
            dtype = getattr(torch, o["transformer_dtype"])
            for name in ("transformer", "transformer_2"):
                module = getattr(pipeline, name, None)
                if module is not None and module.dtype != dtype:
                    module.to(dtype)
        for name, key in cls.frozen_components().items():
            module, dtype = getattr(pipeline, name), component_dtype(o[key], device)
            if module is not None and module.dtype != dtype:
                module.to(dtype)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, o)

    @classmethod
    def check_config(cls, model_cfg: Any) -> None:
        cls.check_source(model_cfg)

    @classmethod
    def check_source(cls, model_cfg: Any) -> str:
        """``model.model_name_or_path`` and ``model.options`` checked before anything loads."""
        path = model_cfg.model_name_or_path
        if path is None:
            local = f" (e.g. {cls.local_example})" if cls.local_example else ""
            raise ValueError(
                f"model.model_name_or_path is required for model_type {cls.model_type!r}. Fix: set "
                f"it to a hub id (e.g. {cls.hub_examples}) or a local {cls.pipeline_class} "
                f"folder{local}.")
        unknown = set(model_cfg.options) - set(cls.option_defaults)
        if unknown:
            raise ValueError(f"model.options: unknown {cls.model_type} option(s) {sorted(unknown)}; "
                             f"valid: {sorted(cls.option_defaults)}.")
        if Path(path).exists() and not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.model_name_or_path: {path!r} is a local path without model_index.json, so "
                f"it is not a diffusers pipeline folder. Fix: point it at a folder written by "
                f"{cls.pipeline_class}.save_pretrained (or a hub id).")
        return path

    @classmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int,
             transformer_device: torch.device | None = None) -> "PipelineAdapter":
        import diffusers

        path = cls.check_source(model_cfg)
        options = {**(read_folder_defaults(path) if cls.folder_defaults else {}), **model_cfg.options}
        pipeline_type = getattr(diffusers, cls.pipeline_class)
        # components saved as None (no T5, no image encoder for IP-Adapter) must be passed as None
        index = pipeline_type.load_config(path)
        extra = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        extra.update({k: None for k in cls.skipped_components({**cls.option_defaults, **options})})
        extra.update(cls.preloaded_components(path, {**cls.option_defaults, **options}))
        if options.get("transformer_dtype") in TRANSFORMER_DTYPES:  # read in it: no float32 copy first
            dtype = getattr(torch, options["transformer_dtype"])
            extra["torch_dtype"] = {"transformer": dtype, "transformer_2": dtype, "default": torch.float32}
        pipeline = pipeline_type.from_pretrained(path, **extra)
        adapter = cls.from_pipeline(pipeline, options, device, transformer_device)
        if model_cfg.scheduler_shift is not None:
            adapter.shift_override = adapter.scheduler_shift = float(model_cfg.scheduler_shift)
        return adapter

    @classmethod
    def write_folder_defaults(cls, path: str | Path, options: dict[str, Any]) -> None:
        """Store the ``options`` that differ from :attr:`option_defaults` in ``path/flowrl.json``
        (nothing when none does)."""
        keep = {k: v for k, v in options.items() if v != cls.option_defaults[k]}
        if keep:
            (Path(path) / FOLDER_DEFAULTS).write_text(json.dumps(keep, indent=2) + "\n")

    def save_pretrained(self, path: str) -> None:
        """``pipeline.save_pretrained`` (+ ``flowrl.json`` with :attr:`folder_defaults`)."""
        self.pipeline.save_pretrained(path)
        if self.folder_defaults:
            self.write_folder_defaults(path, self.options)

    def encoder_modules(self) -> dict[str, torch.nn.Module]:
        """The pipeline's :attr:`text_encoders` that are loaded (``None`` ones skipped)."""
        return {name: m for name in self.text_encoders if (m := getattr(self.pipeline, name, None)) is not None}

    # ------------------------------------------------------------------ conventions
    def tokenizer_limits(self, *entries: tuple[str, str, int, str], render=None) -> list[TokenLimit]:
        """:class:`TokenLimit` for each ``(tokenizer attribute, encoder name, limit, fix)`` whose
        tokenizer the pipeline has (a skipped encoder's is ``None``); ``render`` turns a prompt into
        the text the tokenizer sees (a chat template), default the prompt itself."""
        out = []
        for attr, encoder, limit, fix in entries:
            tokenizer = getattr(self.pipeline, attr, None)
            if tokenizer is not None:
                out.append(TokenLimit(f"{encoder} ({attr})", int(limit),
                                      lambda p, t=tokenizer: tokens(t, render(p) if render else p), fix))
        return out

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    def latent_hw(self, resolution: tuple[int, int], patch: int, patch_name: str) -> tuple[int, int]:
        """Latent ``(H / f, W / f)`` for an image of ``resolution = (H, W)`` pixels (``f`` = VAE
        scale factor); raises unless ``H`` and ``W`` are multiples of ``f * patch``, the
        transformer's ``patch_name`` (e.g. ``"2x2 latent packing"``) on top of the VAE."""
        h, w = resolution
        f = self.vae_scale_factor
        if h % (f * patch) or w % (f * patch):
            raise ValueError(
                f"resolution {h}x{w} does not fit {self.model_type}: height and width must be multiples "
                f"of {f * patch} (VAE factor {f} x {patch_name}). Fix: change train.resolution / "
                f"eval.resolution.")
        return h // f, w // f

    def packed_latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        """``[C, H / f, W / f]`` for a transformer on 2x2-packed latent tokens (FLUX.1, Qwen-Image):
        flowrl keeps latents spatial; ``C`` (VAE latent channels) is a quarter of the transformer's
        packed input channels."""
        h, w = self.latent_hw(resolution, 2, "2x2 latent packing")
        return (self.transformer.config.in_channels // 4, h, w)

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> ``(z - shift_factor) * scaling_factor`` with ``z`` the
        ``AutoencoderKL`` posterior mean (SD3, FLUX.1, Z-Image): what :meth:`decode` inverts."""
        vae = self.pipeline.vae
        z = vae.encode((images * 2 - 1).to(self.device, vae.dtype)).latent_dist.mean
        return (z.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, H / f, W / f]`` normalized as ``(z - shift_factor) * scaling_factor``
        (``AutoencoderKL``: SD3, FLUX.1, Z-Image) -> images ``[B, 3, H, W]`` in [0, 1]. Families
        with another latent normalization override it."""
        vae = self.pipeline.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def resolution_mu(self, resolution: int | tuple[int, int]) -> float:
        """The pipeline's resolution-dependent ``mu`` (diffusers ``calculate_shift``, linear in the
        number of 2x2 latent patches, ``(H / 2f) (W / 2f)``) from the scheduler config."""
        config = self.pipeline.scheduler.config
        h, w = _pair(resolution)
        step = 2 * self.vae_scale_factor
        return resolution_shift_mu((h // step) * (w // step),
                                   config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                   config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    def shift_for_resolution(self, resolution: int | tuple[int, int]) -> float:
        """The SD3-style shift equal to the pipeline's ``mu`` shift at ``resolution``.

        With ``use_dynamic_shifting``: ``exp(mu)`` for the exponential time shift, ``mu`` for the
        linear one (:meth:`resolution_mu`). Otherwise the scheduler's static ``shift``. A
        scheduler's ``shift_terminal`` stretch is not a shift; only :meth:`pipeline_sigmas` has it.
        """
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        mu = self.resolution_mu(resolution)
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

    def base_sigmas(self, num_steps: int) -> list[float] | np.ndarray:
        """The unshifted sigmas the pipeline's ``__call__`` hands its scheduler:
        ``linspace(1, 1/N, N)`` in float64 (FluxPipeline, QwenImagePipeline)."""
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def pipeline_sigmas(self, num_steps: int, resolution: int | tuple[int, int]) -> torch.Tensor:
        """The grid the pipeline's own ``__call__`` denoises on at ``resolution``: ``[N + 1]``
        float32 on the CPU, from 1 to a final 0.

        A fresh scheduler from the pipeline's scheduler config (the pipeline's own is left alone)
        set like ``__call__`` does, with :meth:`base_sigmas` and ``mu =``
        :meth:`resolution_mu`: so dynamic shifting, ``shift_terminal`` and the rest of the
        scheduler config apply exactly as in the pipeline.
        """
        num_steps = operator.index(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(sigmas=self.base_sigmas(num_steps), mu=self.resolution_mu(resolution))
        return scheduler.sigmas.to(device="cpu", dtype=torch.float32)

    def sigmas(self, num_steps: int, resolution: tuple[int, int]) -> torch.Tensor:
        """With :attr:`pipeline_grid` and no ``model.scheduler_shift``: :meth:`pipeline_sigmas` at
        the rollout's resolution; otherwise flowrl's ``flow_sigmas(num_steps, scheduler_shift)``."""
        if self.pipeline_grid and self.shift_override is None:
            return self.pipeline_sigmas(num_steps, resolution)
        return super().sigmas(num_steps, resolution)


class EmbeddedGuidance:
    """Mixin for guidance-distilled transformers (FLUX.1 [dev], FLUX.2 [dev]): the guidance
    scale is an input of ONE forward (``guidance`` tensor ``[B]``), not a CFG combination of two;
    there is no negative prompt. A transformer without a guidance embedding ignores the scale,
    as its pipeline does."""

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond, guidance_scale: float,
                 transformer=None) -> torch.Tensor:
        """Float32 velocity ``[B, ...]`` for ``latents`` at ``sigma [B]`` with embedded guidance."""
        module = transformer if transformer is not None else self.transformer
        tensors = dict(cond.tensors)
        if self.transformer.config.guidance_embeds:
            tensors["guidance"] = torch.full((latents.shape[0],), float(guidance_scale),
                                             device=latents.device, dtype=torch.float32)
        return self.predict(module, latents, sigma, tensors).float()
