"""The toy pipeline: a real ``StableDiffusion3Pipeline`` at miniature size, built offline.

Components (all real diffusers / transformers classes, random weights until
``scripts/pretrain_toy.py`` trains them):

* ``tokenizer`` / ``tokenizer_2``: ``CLIPTokenizer`` over a byte-pair vocabulary trained here
  with the ``tokenizers`` library on the toy prompt corpus (``</w>`` end-of-word suffix, as
  CLIP's), ``model_max_length`` = :data:`MAX_TOKENS`;
* ``text_encoder`` / ``text_encoder_2``: two tiny ``CLIPTextModelWithProjection``;
* ``text_encoder_3`` / ``tokenizer_3``: ``None`` (no T5). The adapter passes
  ``max_sequence_length=0`` (stored in the folder's ``flowrl.json``), so no zero T5 tokens are
  appended; when calling the pipeline directly pass ``max_sequence_length=0`` too;
* ``vae``: ``AutoencoderKL`` with a 4x downsampling (64x64 RGB <-> 4x16x16 latents);
* ``transformer``: ``SD3Transformer2DModel`` (MMDiT), 2x2 patches -> 64 image tokens;
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler(shift=1.0)``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 16
IMAGE_SIZE = 64
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

#: sizes of the shipped toy pipeline (about 2.9 M parameters, ~12 MB in float32)
TOY_SIZES: dict[str, Any] = {
    "transformer": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                        caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=16),
    "vae": dict(block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8,
                latent_channels=4),
    "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                 projection_dim=64),
}


def toy_sizes(text_width: int = 64, text_layers: int = 2, dit_layers: int = 4) -> dict[str, Any]:
    """:data:`TOY_SIZES` with text encoders of width ``text_width`` and ``text_layers`` layers
    (heads of width 32, MLP 2x wide, projection = width) and an MMDiT of ``dit_layers`` joint
    blocks (~0.6 M parameters, 2.4 MB in float32, each); the transformer's
    ``joint_attention_dim`` and ``pooled_projection_dim`` follow the text width (SD3 concatenates
    the two CLIPs' features). The defaults give :data:`TOY_SIZES` itself."""
    if text_width < 32 or text_width % 32 or text_layers < 1 or dit_layers < 1:
        raise ValueError(f"text_width must be a multiple of 32 (>= 32), text_layers and dit_layers >= 1, "
                         f"got {text_width}, {text_layers} and {dit_layers}")
    sizes = {k: dict(v) for k, v in TOY_SIZES.items()}
    sizes["text"].update(hidden_size=text_width, intermediate_size=2 * text_width,
                         num_attention_heads=max(2, text_width // 32), num_hidden_layers=text_layers,
                         projection_dim=text_width)
    sizes["transformer"].update(joint_attention_dim=2 * text_width, pooled_projection_dim=2 * text_width,
                                num_layers=dit_layers)
    return sizes


#: a much smaller variant for unit tests (builds and runs in well under a second)
TEST_SIZES: dict[str, Any] = {
    "transformer": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16),
    "vae": dict(block_out_channels=[8, 8, 16], layers_per_block=1, norm_num_groups=4,
                latent_channels=4),
    "text": dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                 projection_dim=16),
}

EXTRA_WORDS = ("a an the of and with on in photo picture image left right above below next to "
               "one two three four five big small cat dog car tree house sky red blue green "
               "yellow purple cyan orange white black circle circles square squares triangle "
               "triangles").split()


def default_corpus() -> list[str]:
    """Every toy-world prompt plus common words, so ordinary prompts tokenize into real pieces."""
    from shared.toy.scenes import all_prompts, prompt_text

    return [prompt_text(s) for s in all_prompts()] + [" ".join(EXTRA_WORDS)]


def build_tokenizer(directory: str | Path, corpus: list[str] | None = None, vocab_size: int = 160,
                    pad_token: str = EOS):
    """Train a CLIP-style BPE on ``corpus`` and save it as a ``CLIPTokenizer`` in ``directory``.

    Lower-cased, whitespace/punctuation pre-tokenized, ``</w>`` marks the end of a word (CLIP's
    convention), ``<|startoftext|>`` / ``<|endoftext|>`` added by ``CLIPTokenizer`` itself.
    Deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    corpus = default_corpus() if corpus is None else corpus
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.model.save(tmp)
        vocab = json.loads(Path(vocab_file).read_text())
        for ch in alphabet:  # CLIP's BPE needs "x</w>" for every single-character word end
            vocab.setdefault(ch + "</w>", len(vocab))
        Path(vocab_file).write_text(json.dumps(vocab))
        tok = CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=MAX_TOKENS)
        tok.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)


def build_toy_pipeline(sizes: dict[str, Any] | None = None, seed: int = 0,
                       tokenizer_dir: str | Path | None = None):
    """A random-weight toy ``StableDiffusion3Pipeline`` (float32, CPU).

    Args:
        sizes: :data:`TOY_SIZES` (default) or :data:`TEST_SIZES`-shaped dict.
        seed: seeds every component's initialization.
        tokenizer_dir: an existing tokenizer folder; default builds one in a temp folder.
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    sizes = sizes or TOY_SIZES
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_dir is None:
            tokenizer = build_tokenizer(Path(tmp) / "tok")
        else:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = tokenizer  # SD3 uses two CLIP tokenizers; ours share one vocabulary
    t, v, c = sizes["transformer"], dict(sizes["vae"]), sizes["text"]
    vocab = len(tokenizer)
    text_cfg = CLIPTextConfig(vocab_size=vocab, max_position_embeddings=MAX_TOKENS,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", **c)
    if t["joint_attention_dim"] != 2 * c["hidden_size"] or t["pooled_projection_dim"] != 2 * c["projection_dim"]:
        raise ValueError("toy sizes: joint_attention_dim must be 2 x text hidden_size and "
                         "pooled_projection_dim 2 x projection_dim (SD3 concatenates the two CLIPs)")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**t)
    n_blocks = len(v["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n_blocks,
                        up_block_types=["UpDecoderBlock2D"] * n_blocks, act_fn="silu",
                        sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0,
                        use_quant_conv=False, use_post_quant_conv=False,
                        mid_block_add_attention=False, **v)
    text_encoder = CLIPTextModelWithProjection(text_cfg)
    text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_toy_pipeline(pipeline, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` plus the ``flowrl.json`` the ``sd3-5`` adapter reads its defaults from."""
    from shared.models.sd3 import write_folder_defaults

    directory = Path(directory)
    pipeline.save_pretrained(directory)
    write_folder_defaults(directory, {"max_sequence_length": 0, **(extra or {})})
    return directory
