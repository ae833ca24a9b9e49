"""``imagereward``: ImageReward v1.0 (Xu et al., NeurIPS 2023), the human-preference reward of
Flow-GRPO's ``imagereward`` and of ReFL. Pointwise.

BLIP's BERT text encoder reads the prompt while cross-attending to the ViT-L/16 image tokens; an
MLP maps its ``[CLS]`` output to a score, standardized as ImageReward does::

    reward = (MLP(h_cls) - 0.16717362830052426) / 1.0333394966054072

so rewards read as z-scores over the authors' preference data (typically -2 to 2).

The released weights (``ImageReward.pt`` in the ``THUDM/ImageReward`` hub repository) are a state
dict in BLIP's original layout (a timm-style ViT and BLIP's ``med.py`` BERT). flowrl needs neither
the ``image-reward`` package nor timm or fairscale: :func:`blip_to_hf` renames the weights into
``transformers``' ``BlipVisionModel`` and ``BlipTextModel``, whose sizes are read from the tensors
(64-wide attention heads, as in both released towers). The tokenizer is BLIP's,
``bert-base-uncased``, truncating at 35 tokens as ImageReward does; images are preprocessed as
tensors like ImageReward's PIL pipeline (bicubic resize of the short edge to 224, center crop,
CLIP's mean and std).

Options: ``checkpoint`` (a local file, or ``org/repo/file`` on the hub; default
``THUDM/ImageReward/ImageReward.pt``), ``tokenizer_name_or_path`` (default ``bert-base-uncased``).
The towers run in ``dtype``; the MLP and the standardization in float32.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from shared.rewards.base import RewardModel
from shared.rewards.clip_rewards import (
    ClipImageTransform,
    load_pretrained,
    load_torch_state,
    no_random_init,
    resolve_file,
)

CHECKPOINT = "THUDM/ImageReward/ImageReward.pt"
TOKENIZER = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64
MLP_WIDTHS = (1024, 128, 64, 16, 1)

# BLIP's timm ViT -> transformers BlipVisionModel
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# parts of BLIP_Pretrain that scoring does not use (contrastive projections, buffers)
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj|itm_head|temp|image_queue|text_queue|idx_queue|ptr_queue)\b"
                     r"|position_ids$")


def blip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ImageReward state dict (BLIP's original names; ``module.`` prefixes allowed) ->
    :class:`ImageRewardNet` names: ``blip.visual_encoder.*`` -> ``vision.*`` (timm's ViT names
    to ``BlipVisionModel``'s; the fused ``qkv`` keeps its rows q, k, v), ``blip.text_encoder.*``
    -> ``text.*`` (``med.py``'s BERT names are ``BlipTextModel``'s already), ``mlp.layers.N`` ->
    ``mlp.N``. Unused BLIP parts are dropped; :class:`KeyError` names any other key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if _UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name in _VISION_TOP:
                out[f"vision.{_VISION_TOP[name]}"] = value
                continue
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
            if match is None or match[2] not in _VISION_BLOCK:
                raise KeyError(f"ImageReward key {key!r}: not a part of BLIP's ViT that flowrl knows")
            out[f"vision.encoder.layers.{match[1]}.{_VISION_BLOCK[match[2]]}.{match[3]}"] = value
        elif key.startswith("blip.text_encoder."):
            name = key.removeprefix("blip.text_encoder.")
            if not name.startswith(("embeddings.", "encoder.layer.")):
                raise KeyError(f"ImageReward key {key!r}: not a part of BLIP's text encoder that flowrl knows")
            out[f"text.{name}"] = value
        elif key.startswith("mlp.layers."):
            out[f"mlp.{key.removeprefix('mlp.layers.')}"] = value
        else:
            raise KeyError(f"ImageReward key {key!r} has no counterpart in flowrl's ImageReward model")
    return out


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def configs_from_state(state: dict[str, torch.Tensor]):
    """``(BlipVisionConfig, BlipTextConfig)`` of the towers in a :func:`blip_to_hf` state dict,
    read from the tensor shapes (heads ``HEAD_DIM`` wide). ImageReward v1.0: ViT-L/16 at 224
    (1024 wide, 24 layers) and BERT-base with cross-attention (768 wide, 12 layers, 30524 tokens)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        width = state["vision.embeddings.class_embedding"].shape[-1]
        patch = state["vision.embeddings.patch_embedding.weight"].shape[-1]
        grid = math.isqrt(state["vision.embeddings.position_embedding"].shape[1] - 1)
        words = state["text.embeddings.word_embeddings.weight"]
        cross = state["text.encoder.layer.0.crossattention.self.key.weight"]
        vision = BlipVisionConfig(
            hidden_size=width, num_hidden_layers=_layers(state, "vision.encoder.layers."),
            num_attention_heads=max(width // HEAD_DIM, 1), patch_size=patch, image_size=grid * patch,
            intermediate_size=state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
            layer_norm_eps=1e-6, hidden_act="gelu")
        text = BlipTextConfig(
            vocab_size=words.shape[0], hidden_size=words.shape[1], encoder_hidden_size=cross.shape[1],
            num_hidden_layers=_layers(state, "text.encoder.layer."),
            num_attention_heads=max(words.shape[1] // HEAD_DIM, 1),
            intermediate_size=state["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=state["text.embeddings.position_embeddings.weight"].shape[0],
            layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True,  # is_decoder: build cross-attention
            bos_token_id=None, sep_token_id=None)  # generation-only ids, unused by an encoder
    except KeyError as e:
        raise ValueError(f"not an ImageReward checkpoint: it has no {e.args[0]!r} (after renaming)") from None
    return vision, text


class ImageRewardNet(nn.Module):
    """BLIP's image tower, its image-grounded text encoder and ImageReward's MLP head.

    ``forward(pixel_values [B, 3, S, S], input_ids [B, L], attention_mask [B, L])`` -> standardized
    rewards ``[B]`` float32."""

    def __init__(self, vision_config, text_config) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        widths = (text_config.hidden_size, *MLP_WIDTHS)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < 3:  # ImageReward's dropouts keep its layer indices (0, 2, 4, 6, 7); no activations
                layers.append(nn.Dropout((0.2, 0.2, 0.1)[i]))
        self.mlp = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return ((self.mlp(text[:, 0].float()) - MEAN) / STD).squeeze(-1)


class ImageReward(RewardModel):
    """ImageReward v1.0 (module docstring): the standardized human-preference score of (image, prompt).

    Args:
        checkpoint: ``ImageReward.pt``: a local file, or ``org/repo/file`` on the hub.
        tokenizer_name_or_path: BLIP's BERT tokenizer (local folder or hub id).
    """

    kind = "pointwise"

    def __init__(self, *, checkpoint: str = CHECKPOINT, tokenizer_name_or_path: str = TOKENIZER,
                 **options) -> None:
        super().__init__(**options)
        from transformers import AutoTokenizer

        fix = ("download ImageReward.pt from the THUDM/ImageReward hub repository where flowrl runs and point "
               "checkpoint at it.")
        state = load_torch_state(resolve_file(checkpoint, option="checkpoint", who=self.name, fix=fix),
                                 option="checkpoint", who=self.name)
        state = state.get("state_dict", state)
        try:
            state = blip_to_hf(state)
            vision, text = configs_from_state(state)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{self.name}: checkpoint '{checkpoint}': {e.args[0]}. Fix: {fix}") from None
        with no_random_init():  # every weight comes from the checkpoint
            model = ImageRewardNet(vision, text)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{self.name}: checkpoint '{checkpoint}' does not fit ImageReward's architecture: "
                             f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                             f"{unexpected[:4]}. Fix: {fix}")
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer_name_or_path,
                                         option="tokenizer_name_or_path", who=self.name)
        if len(self.tokenizer) > text.vocab_size:
            raise ValueError(f"{self.name}: tokenizer '{tokenizer_name_or_path}' has {len(self.tokenizer)} tokens, "
                             f"more than the checkpoint's {text.vocab_size}. Fix: use BLIP's tokenizer, "
                             f"{TOKENIZER}.")
        self.max_length = min(MAX_LENGTH, text.max_position_embeddings)
        size = vision.image_size
        self.transform = ClipImageTransform(resize=size, crop=(size, size), mean=CLIP_MEAN, std=CLIP_STD,
                                            round_crop=True)  # torchvision's CenterCrop, as ImageReward
        model = model.eval().requires_grad_(False)
        model.vision.to(device=self.device, dtype=self.dtype)
        model.text.to(device=self.device, dtype=self.dtype)
        self.model = model.to(self.device)  # the MLP stays float32

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
