"""Two denoisers that split the noise levels between them, as one module (Wan2.2-A14B).

Wan2.2's A14B pipelines (``WanPipeline`` / ``WanImageToVideoPipeline`` with ``transformer_2`` and
``boundary_ratio``) denoise with two experts: ``transformer`` for the high-noise steps (timestep
``>= boundary_ratio * num_train_timesteps``) and ``transformer_2`` for the rest.
:class:`TwoExperts` holds both and routes every sample of a call to the expert of its timestep,
so the rest of flowrl keeps treating "the transformer" as one module: LoRA goes on both experts
(parameter names ``transformer.*`` and ``transformer_2.*``), EMA views, the reference model (LoRA
off), DDP and published weights work unchanged, and a batch whose samples straddle the boundary
(training replays draw timesteps per sample) runs each part through its own expert.

Checkpoints save the experts separately in the diffusers layout (:func:`denoiser_parts`):
``lora/`` (``transformer``) and ``lora_2/`` (``transformer_2``, loaded with
``pipe.load_lora_weights(path, load_into_transformer_2=True)``), or ``transformer/`` and
``transformer_2/`` for full fine-tuning.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class TwoExperts(nn.Module):
    """``transformer`` (timestep ``>= boundary``) and ``transformer_2`` (below) called as one.

    Args:
        transformer: the high-noise expert.
        transformer_2: the low-noise expert (same input / output layout).
        boundary: the boundary timestep, ``boundary_ratio * num_train_timesteps`` (timesteps are
            ``1000 * sigma`` in flowrl).
    """

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary: float) -> None:
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary = float(boundary)
        #: under ``train.fsdp``: a function taking this process's ``[2]`` int tensor (needs the high /
        #: low expert) and returning its max over the processes; each expert any process needs then
        #: runs on every process, which a sharded expert requires (see :meth:`_forward_agreed`)
        self.agree: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ----------------------------------------------------------------- what callers read
    @property
    def config(self) -> Any:
        """The high-noise expert's config (both experts share the layout)."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def parts(self) -> list[tuple[str, nn.Module]]:
        """``[("transformer", high), ("transformer_2", low)]``: the pipeline's names."""
        return [("transformer", self.transformer), ("transformer_2", self.transformer_2)]

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which samples the high-noise expert takes. ``timestep``: ``[B]`` or, with
        per-token timesteps, ``[B, T]`` (a sample's noise level is its largest timestep)."""
        t = timestep if timestep.dim() == 1 else timestep.amax(dim=1)
        return t >= self.boundary

    # ----------------------------------------------------------------- the call
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        """The experts' output for ``hidden_states [B, ...]`` at ``timestep [B]`` (or ``[B, T]``);
        keyword arguments go to the expert, batched ones (first axis ``B``) split with the batch.
        Returns a 1-tuple like the diffusers models with ``return_dict=False``."""
        kwargs["return_dict"] = False
        high = self.high_noise(timestep)
        if self.agree is not None:
            return self._forward_agreed(hidden_states, timestep, high, kwargs)
        if bool(high.all()):
            return self.transformer(hidden_states=hidden_states, timestep=timestep, **kwargs)
        if not bool(high.any()):
            return self.transformer_2(hidden_states=hidden_states, timestep=timestep, **kwargs)
        b = hidden_states.shape[0]

        def pick(index: torch.Tensor) -> dict[str, Any]:
            return {k: v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
                    for k, v in kwargs.items()}

        hi, lo = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)
        out_hi = self.transformer(hidden_states=hidden_states[hi], timestep=timestep[hi], **pick(hi))[0]
        out_lo = self.transformer_2(hidden_states=hidden_states[lo], timestep=timestep[lo], **pick(lo))[0]
        out = out_hi.new_empty((b, *out_hi.shape[1:]))
        out = out.index_copy(0, hi, out_hi).index_copy(0, lo, out_lo.to(out_hi.dtype))
        return (out,)

    def _forward_agreed(self, hidden_states: torch.Tensor, timestep: torch.Tensor, high: torch.Tensor,
                        kwargs: dict[str, Any]) -> tuple[torch.Tensor]:
        """Every expert that any process needs runs here too: on this process's samples for it, or,
        when it has none, on a stand-in (its first sample) whose output enters the result times zero.
        So gradients are exactly what the experts' own samples give (zero from the stand-in, and the
        expert's gradient exists, as DDP's averaging would make it), and an expert no process needs
        runs nowhere (no gradient, as under DDP)."""
        b = hidden_states.shape[0]

        def pick(index: torch.Tensor) -> dict[str, Any]:
            return {k: v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
                    for k, v in kwargs.items()}

        mine = torch.stack([high.any(), (~high).any()]).to(device=hidden_states.device, dtype=torch.int32)
        need = [bool(n) for n in self.agree(mine)]
        out, stand_in = None, None
        for expert, index, needed in ((self.transformer, high.nonzero().squeeze(1), need[0]),
                                      (self.transformer_2, (~high).nonzero().squeeze(1), need[1])):
            if not needed:
                continue
            if index.numel() == 0:
                first = torch.zeros(1, dtype=torch.long, device=hidden_states.device)
                y = expert(hidden_states=hidden_states[first], timestep=timestep[first], **pick(first))[0]
                stand_in = y.float().sum() * 0 if stand_in is None else stand_in + y.float().sum() * 0
                continue
            y = expert(hidden_states=hidden_states[index], timestep=timestep[index], **pick(index))[0]
            if out is None:
                out = y.new_empty((b, *y.shape[1:]))
            out = out.index_copy(0, index, y.to(out.dtype))
        assert out is not None  # this process's samples need at least one expert
        return (out if stand_in is None else out + stand_in.to(out.dtype),)

    # ----------------------------------------------------------------- diffusers model methods, on both
    def add_adapter(self, config: Any, adapter_name: str = "default") -> None:
        for _, expert in self.parts():
            expert.add_adapter(config, adapter_name=adapter_name)

    def disable_adapters(self) -> None:
        for _, expert in self.parts():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for _, expert in self.parts():
            expert.enable_adapters()

    @property
    def _supports_gradient_checkpointing(self) -> bool:
        return all(getattr(e, "_supports_gradient_checkpointing", False) for _, e in self.parts())

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        for _, expert in self.parts():
            expert.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func)

    def set_attention_backend(self, backend: str) -> None:
        for _, expert in self.parts():
            expert.set_attention_backend(backend)


def denoiser_parts(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The pipeline components a denoiser module consists of: ``[("transformer", module)]``, or
    both experts of a :class:`TwoExperts`."""
    return module.parts() if isinstance(module, TwoExperts) else [("transformer", module)]


def lora_dir_name(component: str) -> str:
    """Checkpoint folder of a component's LoRA: ``lora`` (transformer), ``lora_2`` (transformer_2)."""
    return "lora" if component == "transformer" else "lora" + component.removeprefix("transformer")


def pipeline_denoiser(pipeline: Any) -> nn.Module:
    """What a diffusers pipeline denoises with: its transformer, or :class:`TwoExperts` over
    ``transformer`` and ``transformer_2`` when its config has ``boundary_ratio`` (Wan2.2-A14B)."""
    ratio = pipeline.config.get("boundary_ratio") if hasattr(pipeline, "config") else None
    second = getattr(pipeline, "transformer_2", None)
    if ratio is None and second is None:
        return pipeline.transformer
    if ratio is None or second is None or pipeline.transformer is None:
        have = [n for n in ("transformer", "transformer_2") if getattr(pipeline, n, None) is not None]
        raise ValueError(
            f"this {type(pipeline).__name__} has {' and '.join(have) or 'no transformer'} and boundary_ratio="
            f"{ratio}: a two-expert pipeline (Wan2.2-A14B) needs transformer, transformer_2 and boundary_ratio. "
            f"Fix: point model.model_name_or_path at the complete pipeline folder (e.g. "
            f"Wan-AI/Wan2.2-T2V-A14B-Diffusers).")
    steps = pipeline.scheduler.config.get("num_train_timesteps", 1000)
    return TwoExperts(pipeline.transformer, second, float(ratio) * float(steps))
