"""The model-adapter interface: what the rollout loop and the trainer need from a generator.

An adapter wraps one diffusers model family. It encodes prompts, runs ONE velocity
prediction (with classifier-free guidance when asked), and decodes latents to images.
The denoising loop itself lives in :mod:`shared.sampling`, so sampler and trainer run the
same code. Every method that runs the denoiser takes the module to call as an argument
(``transformer=``) so the trainer can pass its DDP-wrapped copy, an EMA view
(:class:`ParamView`) or the frozen reference, and the adapter stays stateless about which.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from shared.flow import flow_sigmas
from shared.registry import Registry

MODELS: Registry[type["FlowModelAdapter"]] = Registry("model_type")


@dataclasses.dataclass
class Conditioning:
    """Encoded prompts for a batch: named tensors, each ``[B, ...]``.

    ``negative`` holds the unconditional / negative-prompt encodings (same keys) and is
    present only when classifier-free guidance is used.
    """

    tensors: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor] | None = None

    def select(self, index: torch.Tensor | slice) -> "Conditioning":
        pick = lambda d: None if d is None else {k: v[index] for k, v in d.items()}  # noqa: E731
        return Conditioning(pick(self.tensors), pick(self.negative))

    def to(self, device: torch.device | str) -> "Conditioning":
        move = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Conditioning(move(self.tensors), move(self.negative))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        keys = parts[0].tensors.keys()
        tensors = {k: _cat_key(k, [p.tensors[k] for p in parts]) for k in keys}
        negative = None
        if parts[0].negative is not None:
            negative = {k: _cat_key(k, [p.negative[k] for p in parts]) for k in keys}  # type: ignore[index]
        return Conditioning(tensors, negative)


def _cat_key(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of one conditioning entry over micro-batches; shapes that differ beyond the
    batch axis (condition images of other sizes or counts) are an error naming the fix."""
    shapes = sorted({tuple(t.shape[1:]) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(f"conditioning {key!r} has per-sample shapes {shapes} in different micro-batches; "
                         f"conditioning is batched, so every sample needs one shape. For condition images: "
                         f"give every row the same number of images and use model.options.condition_size: "
                         f"output (or images of one aspect ratio).")
    return torch.cat(tensors)


class ParamView(nn.Module):
    """Call ``module`` with some parameters replaced (EMA or old-policy weights), no copies.

    Uses :func:`torch.func.functional_call`; parameters not in ``params`` keep their live values.
    """

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_module", module)  # not registered: no double counting
        self._params = params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._module, self._params, args, kwargs, strict=False)


class FlowModelAdapter(ABC):
    """One generator family. Subclasses register with ``@MODELS.register("name")``."""

    model_type: ClassVar[str]
    #: LoRA targets used when ``model.target_modules: default``
    default_lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]

    #: True for video families: rollouts have a frame axis and decode to ``[B, F, 3, H, W]``
    video: ClassVar[bool] = False
    #: condition images per sample, ``(min, max)`` (max ``None`` = any); ``(0, 0)``: text only.
    #: Image-conditioned families take ``images=`` (per sample, RGB PIL images) and
    #: ``resolution=`` (the rollout's ``(H, W)``) in :meth:`encode_prompts` (:mod:`shared.models.edit`)
    condition_images: ClassVar[tuple[int, int | None]] = (0, 0)

    #: True when the transformer attends with a padding mask (prompts of different token lengths in one
    #: batch, or prompt vs negative prompt): attention backends without mask support are refused at load
    attention_mask: ClassVar[bool] = False

    #: True when some trainable weights get no gradient in a step (Qwen-Image's last block computes
    #: a text stream nothing reads): DDP must then look for unused parameters every step
    unused_parameters: ClassVar[bool] = False

    transformer: nn.Module  # the trainable denoiser
    scheduler_shift: float = 1.0  # SD3-style sigma shift of the default sampling grid (:meth:`sigmas`)

    @classmethod
    def check_config(cls, model_cfg: Any) -> None:
        """What can be checked of ``model:`` without loading anything (the path given, the option
        names), called when the config is read (``flowrl check`` too); raises ``ValueError`` naming the
        fix. The default checks nothing."""

    @classmethod
    @abstractmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int) -> "FlowModelAdapter":
        """Build from ``model:`` config (``model_name_or_path`` hub id or local dir). The built-in
        adapters also take ``transformer_device`` (keep the transformer there, not on ``device``)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode a batch of prompts (no grad). ``cfg`` also encodes the negatives."""

    @abstractmethod
    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        """Per-sample latent shape for an image of ``(height, width)`` pixels."""

    def sample_shape(self, resolution: tuple[int, int], num_frames: int | None = None) -> tuple[int, ...]:
        """Per-sample latent shape of one rollout at ``(height, width)`` pixels and ``num_frames``.

        Image families (this default): :meth:`latent_shape`; ``num_frames`` must be ``None`` or 1.
        Video families (``video = True``) override it: ``[C, F', H / f, W / f]`` with ``F'`` latent
        frames for ``num_frames`` frames (``None`` = the family's default).
        """
        if num_frames not in (None, 1):
            raise ValueError(
                f"model_type {self.model_type} generates images, but {num_frames} frames were asked for "
                f"(train.num_frames / eval.num_frames). Fix: remove num_frames, or use a video model "
                f"(e.g. wan2_t2v).")
        return self.latent_shape(resolution)

    @abstractmethod
    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One denoiser call: velocity ``[B, ...]`` for ``latents`` at noise level ``sigma [B]``."""

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> latents ``[B, ...]`` normalized as :meth:`decode`
        expects them (the VAE posterior mean): the inverse of :meth:`decode`'s normalization, for
        training targets from data (``train.ptx_coef``). Families without it raise."""
        raise NotImplementedError(
            f"model_type {self.model_type} cannot encode images into training latents in this version "
            f"(train.ptx_coef needs it). Fix: set train.ptx_coef: 0, or use a text-to-image family such "
            f"as sd3-5, flux1, z-image, qwen-image or flux2.")

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, ...]`` -> images ``[B, 3, H, W]`` (video families: frames ``[B, F, 3, H, W]``)
        float in [0, 1] (no grad)."""

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Write the whole model so that :meth:`load` can read it back."""

    # ------------------------------------------------------------------ shared logic

    def encoder_modules(self) -> dict[str, nn.Module]:
        """The modules only prompt / condition encoding uses (text encoders; what
        ``model.offload_text_encoders`` moves off the GPU once the embeddings are cached,
        :mod:`shared.embedding_cache`). Default: every ``nn.Module`` attribute but the transformer."""
        return {k: v for k, v in vars(self).items() if isinstance(v, nn.Module) and k != "transformer"}

    def prompt_token_limits(self) -> list:
        """The text encoders' prompt limits (:class:`shared.models.prompt_length.TokenLimit`, one per
        tokenizer); a prompt over one is truncated with one warning per model
        (:func:`shared.models.prompt_length.check_prompt_lengths`). Default: none known."""
        return []

    def sigmas(self, num_steps: int, resolution: tuple[int, int]) -> torch.Tensor:
        """The rollout's sigma grid for ``num_steps`` steps at ``(height, width)`` pixels.

        Returns ``[num_steps + 1]`` float32 on the CPU, descending from 1.0 (noise) to 0.0
        (data); step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``. Default:
        ``shared.flow.flow_sigmas(num_steps, self.scheduler_shift)`` for any resolution. A family
        whose pipeline shifts by resolution overrides it to return the pipeline's own grid.
        Rollouts take their grid only from here (:func:`shared.sampling.rollout_batches`), and
        the trainer replays on the grid stored with each rollout.
        """
        return flow_sigmas(num_steps, self.scheduler_shift)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance_scale: float, transformer: nn.Module | None = None) -> torch.Tensor:
        """Velocity with classifier-free guidance ``v_u + w (v_c - v_u)`` when ``w > 1``.

        Args:
            latents: ``[B, ...]``; sigma: ``[B]`` in [0, 1] (1 = noise).
        Returns:
            float32 ``[B, ...]``.
        """
        module = transformer if transformer is not None else self.transformer
        if guidance_scale > 1.0 and cond.negative is not None:
            v_cond, v_uncond = self.cfg_velocities(module, latents, sigma, cond)
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return self.predict(module, latents, sigma, cond.tensors).float()

    def cfg_velocities(self, module: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                       cond: Conditioning, *, negatives_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_cond, v_uncond)``, float32 ``[B, ...]`` each, from ONE forward of ``module`` on the
        batch ``[negatives; positives]`` (``negatives_first=False``: positives first, for
        pipelines that batch that way; the order can change the result in the last bits)."""
        first, second = (cond.negative, cond.tensors) if negatives_first else (cond.tensors, cond.negative)
        both = {k: torch.cat([first[k], second[k]]) for k in cond.tensors}  # type: ignore[index]
        v = self.predict(module, torch.cat([latents, latents]), torch.cat([sigma, sigma]), both)
        a, b = v.float().chunk(2)
        return (b, a) if negatives_first else (a, b)

    @classmethod
    def lora_targets(cls, target_modules: str | list[str]) -> list[str] | str:
        """``model.target_modules`` as peft's ``target_modules`` (``default``: the family's own list)."""
        if target_modules == "default":
            return list(cls.default_lora_targets)
        if target_modules == "all":
            return "all-linear"
        return [target_modules] if isinstance(target_modules, str) else list(target_modules)


MODELS.base = FlowModelAdapter  # a dotted model_type must name a subclass
