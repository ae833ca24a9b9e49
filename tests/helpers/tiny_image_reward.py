"""A tiny ImageReward checkpoint in BLIP's ORIGINAL layout, a BERT tokenizer built offline, and a
reference forward pass written from BLIP's and ImageReward's source (timm ViT blocks, ``med.py``'s
BERT with cross-attention, ImageReward's activation-free MLP) in plain torch functions, so tests
check flowrl's transformers-based model against the model the checkpoint was written for.

Sizes: 2-layer towers of width 128 (two 64-wide heads), 32x32 images in 8x8 patches, BERT positions 40.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

WIDTH, LAYERS, PATCH, IMAGE = 128, 2, 8, 32
HEADS = WIDTH // 64
WORDS = ["a", "an", "the", "red", "blue", "green", "circle", "square", "cat", "dog", "photo", "of", "two",
         "and", "on", "left", "right", "big", "small", "very", "detailed", "painting", "##s", "##y"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_bert_tokenizer(folder: str | Path) -> Path:
    """A WordPiece ``BertTokenizerFast`` (lower-cased, as bert-base-uncased) over a small vocabulary."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = SPECIAL + WORDS
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        source = {"vocab": {token: i for i, token in enumerate(tokens)}}
    else:
        source = {"vocab_file": str(folder / "vocab.txt")}
    tokenizer = BertTokenizerFast(**source, do_lower_case=True, model_max_length=512)
    assert len(tokenizer) == len(tokens), "the tokenizer did not take the vocabulary"
    tokenizer.save_pretrained(folder)
    return folder


def original_state(seed: int = 0, vocab: int = len(SPECIAL) + len(WORDS) + 2) -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's names (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``mlp.layers.*``), with the unused parts a real checkpoint carries (contrastive projections, the
    persistent ``position_ids`` buffer). Vocab = tokenizer + 2, as BLIP adds [DEC] and [ENC]."""
    g = torch.Generator().manual_seed(seed)

    def lin(name: str, out: int, inp: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": torch.randn(out, inp, generator=g) / inp ** 0.5,
                f"{name}.bias": 0.1 * torch.randn(out, generator=g)}

    def norm(name: str, n: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + 0.1 * torch.randn(n, generator=g), f"{name}.bias": 0.1 * torch.randn(n, generator=g)}

    v = "blip.visual_encoder"
    s = {f"{v}.cls_token": torch.randn(1, 1, WIDTH, generator=g),
         f"{v}.pos_embed": 0.5 * torch.randn(1, (IMAGE // PATCH) ** 2 + 1, WIDTH, generator=g),
         f"{v}.patch_embed.proj.weight": torch.randn(WIDTH, 3, PATCH, PATCH, generator=g) / (3 * PATCH * PATCH) ** 0.5,
         f"{v}.patch_embed.proj.bias": 0.1 * torch.randn(WIDTH, generator=g)}
    for i in range(LAYERS):
        b = f"{v}.blocks.{i}"
        s |= norm(f"{b}.norm1", WIDTH) | lin(f"{b}.attn.qkv", 3 * WIDTH, WIDTH) | lin(f"{b}.attn.proj", WIDTH, WIDTH)
        s |= norm(f"{b}.norm2", WIDTH) | lin(f"{b}.mlp.fc1", 4 * WIDTH, WIDTH) | lin(f"{b}.mlp.fc2", WIDTH, 4 * WIDTH)
    s |= norm(f"{v}.norm", WIDTH)
    t = "blip.text_encoder"
    s |= {f"{t}.embeddings.word_embeddings.weight": torch.randn(vocab, WIDTH, generator=g),
          f"{t}.embeddings.position_embeddings.weight": 0.5 * torch.randn(40, WIDTH, generator=g),
          f"{t}.embeddings.position_ids": torch.arange(40).unsqueeze(0)}
    s |= norm(f"{t}.embeddings.LayerNorm", WIDTH)
    for i in range(LAYERS):
        b = f"{t}.encoder.layer.{i}"
        for part, width_kv in (("attention", WIDTH), ("crossattention", WIDTH)):  # vision width = text width here
            s |= lin(f"{b}.{part}.self.query", WIDTH, WIDTH) | lin(f"{b}.{part}.self.key", WIDTH, width_kv)
            s |= lin(f"{b}.{part}.self.value", WIDTH, width_kv) | lin(f"{b}.{part}.output.dense", WIDTH, WIDTH)
            s |= norm(f"{b}.{part}.output.LayerNorm", WIDTH)
        s |= lin(f"{b}.intermediate.dense", 2 * WIDTH, WIDTH) | lin(f"{b}.output.dense", WIDTH, 2 * WIDTH)
        s |= norm(f"{b}.output.LayerNorm", WIDTH)
    widths = (WIDTH, 1024, 128, 64, 16, 1)
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        s |= lin(f"mlp.layers.{index}", b, a)
    s |= lin("blip.vision_proj", 256, WIDTH) | lin("blip.text_proj", 256, WIDTH)
    return s


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention ``[B, N, C]`` x ``[B, M, C]`` with ``HEADS`` heads (scale d^-1/2)."""
    B, N, C = q.shape
    split = lambda x: x.reshape(B, x.shape[1], HEADS, C // HEADS).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-2, -1) * (C // HEADS) ** -0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, N, C)


def reference_score(s: dict[str, torch.Tensor], pixels: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """ImageReward's score from the ORIGINAL-layout state dict: ``[B]`` float32."""
    lin = lambda x, n: F.linear(x, s[f"{n}.weight"], s[f"{n}.bias"])  # noqa: E731
    ln = lambda x, n, eps: F.layer_norm(x, (x.shape[-1],), s[f"{n}.weight"], s[f"{n}.bias"], eps)  # noqa: E731
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + s[f"{v}.pos_embed"]
    for i in range(LAYERS):  # timm Block: pre-norm, fused qkv (rows q, k, v), exact GELU, LayerNorm eps 1e-6
        b = f"{v}.blocks.{i}"
        q, k, val = lin(ln(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, val), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image = ln(x, f"{v}.norm", 1e-6)
    t = "blip.text_encoder"
    L = input_ids.shape[1]
    h = s[f"{t}.embeddings.word_embeddings.weight"][input_ids] + s[f"{t}.embeddings.position_embeddings.weight"][:L]
    h = ln(h, f"{t}.embeddings.LayerNorm", 1e-12)
    pad = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(LAYERS):  # med.py BertLayer, mode multimodal: self-attention, cross-attention, FFN (post-norm)
        b = f"{t}.encoder.layer.{i}"
        for part, kv, bias in (("attention", None, pad), ("crossattention", image, None)):
            src = h if kv is None else kv
            ctx = _attention(lin(h, f"{b}.{part}.self.query"), lin(src, f"{b}.{part}.self.key"),
                             lin(src, f"{b}.{part}.self.value"), bias)
            h = ln(lin(ctx, f"{b}.{part}.output.dense") + h, f"{b}.{part}.output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, f"{b}.intermediate.dense")), f"{b}.output.dense") + h, f"{b}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{index}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def save_tiny_image_reward(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """``(checkpoint .pt, tokenizer folder)`` under ``root``."""
    root = Path(root)
    tokenizer = save_bert_tokenizer(root / "tokenizer")
    root.mkdir(parents=True, exist_ok=True)
    torch.save(original_state(seed), root / "ImageReward.pt")
    return root / "ImageReward.pt", tokenizer
