"""``tiny``: a real diffusers ``SD3Transformer2DModel`` with a tiny config, for tests and demos.

It has no VAE: latents are the RGB image itself in [-1, 1] (``decode`` maps to [0, 1]), and
the "text encoder" is a frozen, seeded word-hash embedding table, so it builds offline in
milliseconds. It is trained exactly like a real model: LoRA via peft on the same attention
projections as SD3.5, the same timestep convention (``timestep = 1000 * sigma``), CFG.
``model_name_or_path: null`` builds a random model from ``model.options``; a directory
written by :meth:`save_pretrained` loads with diffusers ``from_pretrained``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from shared.models.base import MODELS, Conditioning, FlowModelAdapter

TINY_DEFAULTS: dict[str, Any] = dict(
    num_layers=2, attention_head_dim=16, num_attention_heads=2, text_dim=32, max_tokens=8,
    vocab_size=4096, patch_size=2, pos_embed_max_size=32, shift=1.0,
)


def hash_tokens(prompt: str, vocab_size: int, max_tokens: int) -> list[int]:
    """Stable word-level token ids (crc32 of each lower-cased word), padded with 0."""
    ids = [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in prompt.lower().split()]
    ids = ids[:max_tokens]
    return ids + [0] * (max_tokens - len(ids))


@MODELS.register("tiny")
class TinyAdapter(FlowModelAdapter):
    model_type = "tiny"

    def __init__(self, transformer: SD3Transformer2DModel, text_table: nn.Embedding,
                 options: dict[str, Any]) -> None:
        self.transformer = transformer
        self.text_table = text_table.requires_grad_(False)
        self.options = options
        self.scheduler_shift = float(options["shift"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def check_config(cls, model_cfg: Any) -> None:
        if model_cfg.model_name_or_path is None:
            cls._check_options(model_cfg.options)

    @staticmethod
    def _check_options(options: dict[str, Any]) -> None:
        unknown = set(options) - set(TINY_DEFAULTS)
        if unknown:
            raise ValueError(
                f"model.options: unknown tiny-model option(s) {sorted(unknown)}; "
                f"valid: {sorted(TINY_DEFAULTS)}."
            )

    @classmethod
    def build(cls, options: dict[str, Any], seed: int) -> "TinyAdapter":
        cls._check_options(options)
        o = {**TINY_DEFAULTS, **options}
        torch.manual_seed(seed)
        inner = o["attention_head_dim"] * o["num_attention_heads"]
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=o["patch_size"], in_channels=3, out_channels=3,
            num_layers=o["num_layers"], attention_head_dim=o["attention_head_dim"],
            num_attention_heads=o["num_attention_heads"], joint_attention_dim=o["text_dim"],
            caption_projection_dim=inner, pooled_projection_dim=o["text_dim"],
            pos_embed_max_size=o["pos_embed_max_size"],
        )
        table = nn.Embedding(o["vocab_size"], o["text_dim"])
        return cls(transformer, table, o)

    @classmethod
    def load(cls, model_cfg: Any, *, device: torch.device, seed: int,
             transformer_device: torch.device | None = None) -> "TinyAdapter":
        path = model_cfg.model_name_or_path
        if path is None:
            adapter = cls.build(dict(model_cfg.options), seed)
        else:
            root = Path(path)
            if not (root / "tiny_config.json").is_file():
                raise FileNotFoundError(
                    f"model.model_name_or_path: {path!r} is not a tiny-model folder (no "
                    f"tiny_config.json). Fix: point it at a folder written by save_pretrained, "
                    f"or set it to null to build a random tiny model."
                )
            options = {**json.loads((root / "tiny_config.json").read_text()), **model_cfg.options}
            transformer = SD3Transformer2DModel.from_pretrained(root / "transformer")
            table = nn.Embedding(options["vocab_size"], options["text_dim"])
            table.load_state_dict(load_file(root / "text_encoder.safetensors"))
            adapter = cls(transformer, table, options)
        if model_cfg.scheduler_shift is not None:
            adapter.scheduler_shift = float(model_cfg.scheduler_shift)
        adapter.transformer.to(transformer_device or device)
        adapter.text_table.to(device)
        return adapter

    def save_pretrained(self, path: str) -> None:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(root / "transformer")
        save_file(self.text_table.state_dict(), root / "text_encoder.safetensors")
        (root / "tiny_config.json").write_text(json.dumps(self.options, indent=2))

    def prompt_token_limits(self) -> list:
        from shared.models.prompt_length import TokenLimit

        return [TokenLimit("the tiny word tokenizer", int(self.options["max_tokens"]), lambda p: len(p.split()),
                           "shorten the prompts, or build the tiny model with a larger model.options.max_tokens")]

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, cfg: bool,
                       negative_prompts: list[str] | None = None) -> Conditioning:
        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            ids = torch.tensor([hash_tokens(t, self.options["vocab_size"], self.options["max_tokens"])
                                for t in texts], device=self.text_table.weight.device)
            emb = self.text_table(ids)  # [B, L, D]
            mask = (ids > 0).unsqueeze(-1).float()
            pooled = (emb * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [B, D]
            return {"prompt_embeds": emb, "pooled": pooled}

        negative = None
        if cfg:
            negative = encode(negative_prompts or [""] * len(prompts))
        return Conditioning(encode(prompts), negative)

    def latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        h, w = resolution
        p = self.options["patch_size"]
        limit = self.options["pos_embed_max_size"] * p
        if h % p or w % p or h > limit or w > limit:
            raise ValueError(
                f"resolution {h}x{w} does not fit the tiny model: sides must be multiples of "
                f"{p} and at most {limit}. Fix: change train.resolution / eval.resolution."
            )
        return (3, h, w)

    def predict(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return transformer(
            hidden_states=latents, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"], timestep=sigma * 1000.0, return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)
