"""``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al., 2023), the reward DanceGRPO and MixGRPO
train with: ``cos(image, prompt)`` of a CLIP ViT-H/14 fine-tuned on human preference pairs
(typical values 0.25-0.35). Pointwise.

The released weights (``HPS_v2.1_compressed.pt``, ``HPS_v2_compressed.pt`` in the ``xswu/HPSv2`` hub
repository) are an OpenCLIP state dict. flowrl needs no OpenCLIP (it pulls torchvision): the
state dict is renamed into a ``transformers`` ``CLIPModel`` (:func:`open_clip_to_hf`) whose
architecture comes from ``processor_name_or_path`` (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
the model HPS was fine-tuned from, whose tokenizer, mean and std are OpenCLIP's for ViT-H-14 too).
``model_name_or_path`` instead loads an already converted folder (``save_pretrained``). Images are
preprocessed as HPS's scorer does (its OpenCLIP fork's ``ResizeMaxSize``): the longest edge bicubic
to 224, the rest padded black, so a wide image is scored whole rather than centre-cropped.

Options: ``checkpoint`` (a local ``.pt`` file, or ``org/repo/file.pt`` on the hub; default v2.1),
``model_name_or_path``, ``processor_name_or_path``.
"""

from __future__ import annotations

import dataclasses

import torch

from shared.rewards.clip_rewards import PICKSCORE_PROCESSOR, ClipBackbone

HPS_CHECKPOINT = "xswu/HPSv2/HPS_v2.1_compressed.pt"
VIT_H_14 = PICKSCORE_PROCESSOR  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K

# OpenCLIP -> transformers names inside one residual block, and outside them
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP state dict (``module.`` prefixes allowed) -> ``transformers`` ``CLIPModel``
    names. The fused attention input projection ``in_proj_weight`` / ``bias`` (``[3 D, D]``, rows
    q, k, v as ``nn.MultiheadAttention`` stores them) is split into ``q_proj``, ``k_proj``,
    ``v_proj``; the two output projections (OpenCLIP multiplies ``x @ proj``, ``[width, dim]``)
    become ``Linear`` weights, transposed. Raises ``KeyError`` naming a key it does not know."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif ".transformer.resblocks." in f".{key}":
            tower, rest = key.split("transformer.resblocks.", 1)
            index, name = rest.split(".", 1)
            prefix = f"{'vision_model' if tower == 'visual.' else 'text_model'}.encoder.layers.{index}"
            param = name.rsplit(".", 1)[1]
            if name.startswith("attn.in_proj_"):
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{part}.{'weight' if param == 'in_proj_weight' else 'bias'}"] = chunk.contiguous()
            else:
                module = name.rsplit(".", 1)[0]
                if module not in _BLOCK:
                    raise KeyError(f"OpenCLIP key {key!r}: unknown block part {module!r}")
                out[f"{prefix}.{_BLOCK[module]}.{param}"] = value
        else:
            raise KeyError(f"OpenCLIP key {key!r} has no transformers CLIPModel counterpart")
    return out


class HPSv2(ClipBackbone):
    """HPS v2 / v2.1 (module docstring): ``cos(image, prompt)`` of the preference-tuned ViT-H/14.

    Args:
        checkpoint: the OpenCLIP ``.pt`` (local, or ``org/repo/file`` on the hub); ignored when
            ``model_name_or_path`` names a converted ``CLIPModel`` folder.
        processor_name_or_path: tokenizer, preprocessing and (for ``checkpoint``) the architecture.
    """

    kind = "pointwise"
    default_model = None  # type: ignore[assignment]
    default_processor = VIT_H_14

    def __init__(self, *, checkpoint: str = HPS_CHECKPOINT, **options) -> None:
        self.checkpoint = checkpoint
        super().__init__(**options)
        # HPS scores as its OpenCLIP fork preprocesses: the longest edge to 224, black padding
        self.transform = dataclasses.replace(self.transform, letterbox=True)

    def load_model(self):
        if self.model_name_or_path is not None:
            return super().load_model()
        from transformers import CLIPConfig, CLIPModel

        from shared.rewards.clip_rewards import load_pretrained, load_torch_state, no_random_init, resolve_file

        config = load_pretrained(CLIPConfig.from_pretrained, self.processor_name_or_path,
                                 option="processor_name_or_path", who="hpsv2")
        path = resolve_file(self.checkpoint, option="checkpoint", who="hpsv2",
                            fix="download HPS_v2.1_compressed.pt (or v2's) where flowrl runs and point checkpoint "
                                "at it.")
        state = load_torch_state(path, option="checkpoint", who="hpsv2")
        state = state.get("state_dict", state)
        with no_random_init():  # every weight comes from the checkpoint: skip ViT-H's random init
            model = CLIPModel(config)
        missing, unexpected = model.load_state_dict(open_clip_to_hf(state), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"hpsv2: checkpoint {self.checkpoint!r} does not fit the CLIP architecture of "
                             f"{self.processor_name_or_path!r}: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                             f"unexpected {unexpected[:4]}. Fix: use an HPS v2 / v2.1 checkpoint with the ViT-H-14 "
                             f"processor_name_or_path it was trained from.")
        return model

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.cosine(images, list(prompts))
