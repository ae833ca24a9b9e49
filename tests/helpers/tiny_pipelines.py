"""Tiny random-weight diffusers pipelines, one builder per ``model_type``, built offline.

Every pipeline uses the real diffusers / transformers classes of its family at miniature size
(a few hundred thousand parameters), with tokenizers trained here on a small corpus by the
``tokenizers`` library (no hub access):

* ``sd3-5``: :func:`shared.toy.pipeline.build_toy_pipeline` with ``TEST_SIZES`` (CLIP BPE);
* ``flux1``: ``FluxPipeline`` -- CLIP BPE + a Unigram ``T5Tokenizer``, ``CLIPTextModel`` +
  ``T5EncoderModel``, ``FluxTransformer2DModel`` with a guidance embedding, FLUX.1-dev's
  scheduler config (dynamic shifting);
* ``z-image``: ``ZImagePipeline`` -- byte-level BPE ``Qwen2Tokenizer`` with a Qwen3-style chat
  template, ``Qwen3Model``, ``ZImageTransformer2DModel``, ``AutoencoderKL`` with Z-Image's
  scaling/shift factors, static shift 3;
* ``qwen-image``: ``QwenImagePipeline`` -- the same BPE (its system-prompt prefix tokenizes to
  exactly ``prompt_template_encode_start_idx = 34`` tokens, as with the real Qwen tokenizer),
  ``Qwen2_5_VLForConditionalGeneration``, ``QwenImageTransformer2DModel``,
  ``AutoencoderKLQwenImage`` with non-trivial ``latents_mean`` / ``latents_std``, Qwen-Image's
  scheduler config (dynamic shifting, ``shift_terminal``);
* ``flux2``: ``Flux2Pipeline`` -- a byte-level BPE with Mistral's control tokens (``[INST]``,
  ``[SYSTEM_PROMPT]``, ``[IMG]`` at id 10, ...) and a Mistral-Small-3.1-style chat template,
  ``Mistral3ForConditionalGeneration`` (Mistral text model + Pixtral vision tower),
  ``Flux2Transformer2DModel`` with a guidance embedding, ``AutoencoderKLFlux2`` with non-trivial
  batch-norm running statistics, FLUX.2's scheduler config (dynamic shifting). The tokenizer
  component is the tokenizer itself, not FLUX.2-dev's ``PixtralProcessor``: in transformers 5.x
  that class requires torchvision (``@requires(backends=("torchvision", "torch"))``), which is not
  installed here; for text-only prompts the processor's ``apply_chat_template`` renders the same
  template and tokenizes with this same tokenizer;
* ``flux2-klein``: ``Flux2KleinPipeline`` (``is_distilled=False``: the -base variant, real CFG) --
  the Qwen BPE with the Qwen3 chat template, ``Qwen3ForCausalLM``, ``Flux2Transformer2DModel``
  without a guidance embedding, the same VAE and scheduler.
* ``wan2_t2v``: ``WanPipeline`` -- the Unigram ``T5Tokenizer``, ``UMT5EncoderModel``,
  ``WanTransformer3DModel``, ``AutoencoderKLWan`` (4x space, 4x time), Wan2.1's UniPC scheduler
  config; videos of 5 frames (:func:`build_wan_t2v`).
* ``wan2_i2v``: ``WanImageToVideoPipeline`` on those parts with a tiny ``CLIPVisionModel`` and a
  transformer taking the first-frame condition (:mod:`tests.helpers.tiny_video_pipelines`).

:data:`TINY_PIPELINES` maps each ``model_type`` to a :class:`TinyPipeline`: the builder plus what
a generic test needs to run it (a valid resolution, adapter options, whether the family uses
classifier-free guidance). The adapter contract suite parametrizes over it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

PROMPTS = ["a photo of a red circle", "two blue squares on a table", "a green cat",
           "a yellow triangle left of a purple square"]
NEGATIVE = "blurry, low quality"
EXTRA_TEXT = "a an the of and with on in photo one two three big small dog car tree house sky"

#: Qwen-Image's prompt template; its prefix must tokenize to 34 tokens (the pipeline drops them)
QWEN_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, "
                       "texture, quantity, text, spatial relationships of the objects and "
                       "background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
#: the Qwen3 chat template's output for one user turn (``enable_thinking`` as Qwen3's template)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}")


#: Mistral's tekken control tokens in id order (``[IMG]`` = 10, Mistral3Config's image_token_index)
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
#: Mistral-Small-3.1's chat template, trimmed to what FLUX.2 sends (system + user turns with text or
#: image blocks, as ``diffusers.pipelines.flux2.pipeline_flux2.format_input`` builds them)
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}")


def corpus() -> list[str]:
    return PROMPTS + [NEGATIVE, EXTRA_TEXT, "system user assistant",
                      QWEN_IMAGE_TEMPLATE.format(PROMPTS[0])]


# --------------------------------------------------------------------------- tokenizers


def build_clip_tokenizer(directory: Path):
    from shared.toy.pipeline import build_tokenizer

    return build_tokenizer(directory, corpus=corpus())


def build_t5_tokenizer(directory: Path, vocab_size: int = 120):
    """A Unigram (sentencepiece-style) ``T5Tokenizer`` trained on :func:`corpus`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    T5Tokenizer(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                extra_ids=0, model_max_length=512).save_pretrained(directory)
    return T5Tokenizer.from_pretrained(directory)


def build_qwen_tokenizer(directory: Path, vocab_size: int = 600, templates: tuple[str, ...] = (QWEN_IMAGE_TEMPLATE,)):
    """A byte-level BPE ``Qwen2Tokenizer`` (Qwen2's pre-tokenizer regex) with the chat template.
    Each of ``templates`` (prompt templates with one ``{}``) is frequent enough in the training text
    that its words become single tokens, as in Qwen's real vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the template's prefix is frequent enough that each of its words becomes one token, as in
    # Qwen's real vocabulary (34 tokens: what QwenImagePipeline drops)
    bpe.train_from_iterator(corpus() * 2 + [t.format("") for t in templates] * 20, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=QWEN_SPECIAL[1:])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return Qwen2Tokenizer.from_pretrained(directory)


def build_mistral_tokenizer(directory: Path, vocab_size: int = 600):
    """A byte-level BPE (as Mistral's tekken) with Mistral's control tokens and chat template.

    FLUX.2's system message is in the training corpus often enough that its words become single
    tokens (about 30 tokens, not a few hundred bytes), as with the real vocabulary.
    """
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=MISTRAL_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus() * 2 + [SYSTEM_MESSAGE] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _tiny_vae(latent_channels: int, **factors):
    """``AutoencoderKL`` with a 4x downsampling (3 blocks)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                         up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 16],
                         layers_per_block=1, norm_num_groups=4, latent_channels=latent_channels,
                         sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_add_attention=False, **factors)


# --------------------------------------------------------------------------- pipelines


def build_sd3(seed: int = 0):
    from shared.toy.pipeline import TEST_SIZES, build_toy_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        build_clip_tokenizer(Path(tmp))
        return build_toy_pipeline(TEST_SIZES, seed=seed, tokenizer_dir=tmp)


def build_flux1(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = build_clip_tokenizer(Path(tmp) / "clip")
        t5_tok = build_t5_tokenizer(Path(tmp) / "t5")
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), max_position_embeddings=clip_tok.model_max_length, hidden_size=16,
        intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, projection_dim=16,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                 num_heads=2, relative_attention_num_buckets=8,
                                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=[2, 2, 4])
    vae = _tiny_vae(4, scaling_factor=1.5035, shift_factor=0.0609)  # FLUX.1's VAE factors
    # FLUX.1-dev's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_z_image(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_qwen_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32])
    with torch.no_grad():  # created with torch.empty: give them defined values
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = _tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159)  # Z-Image's VAE factors
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Z-Image's scheduler_config.json
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_qwen_image(seed: int = 0):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_qwen_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    text_encoder = build_qwen_vl(tok)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True],
                                 latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0])
    # Qwen-Image's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_qwen_vl(tok):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (text model + vision tower, eval mode) for ``tok``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tok),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": ids("<|endoftext|>"),
                     "eos_token_id": ids("<|im_end|>"), "pad_token_id": tok.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        vocab_size=len(tok), hidden_size=16, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _tiny_flux2_parts(joint_attention_dim: int, guidance_embeds: bool):
    """The parts FLUX.2 [dev] and [klein] share: transformer, VAE (batch-norm statistics set to
    non-trivial values, so a missing latent normalisation shows), scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                             up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 16],
                             layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=32,
                             use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    with torch.no_grad():  # the batch norm over 2x2-patchified latents: 4 x 4 = 16 channels
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=guidance_embeds)
    # FLUX.2's scheduler_config.json: dynamic shifting, the pipelines pass mu (compute_empirical_mu)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    return transformer, vae, scheduler


def build_flux2(seed: int = 0):
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_mistral_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16,
                     "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8,
                       "image_size": 32, "patch_size": 8},
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    # the prompt embedding stacks 3 hidden states (options text_encoder_out_layers: [1, 2, 3])
    transformer, vae, scheduler = _tiny_flux2_parts(joint_attention_dim=3 * 16, guidance_embeds=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                         transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux2_klein(seed: int = 0):
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_qwen_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id)).eval()
    transformer, vae, scheduler = _tiny_flux2_parts(joint_attention_dim=3 * 16, guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_wan_t2v(seed: int = 0, *, euler: bool = False):
    """``WanPipeline`` -- the Unigram ``T5Tokenizer`` (UMT5's tokenizer is a sentencepiece Unigram
    too), ``UMT5EncoderModel``, ``WanTransformer3DModel`` (patch (1, 2, 2)), ``AutoencoderKLWan``
    with 4x spatial and 4x temporal compression (so ``num_frames = 4k + 1``, as Wan's 8x / 4x VAE)
    and non-trivial ``latents_mean`` / ``latents_std``, Wan2.1's scheduler config
    (``UniPCMultistepScheduler``, flow sigmas, ``flow_shift`` 3.0). ``euler=True``: a
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` instead, whose ``__call__`` steps are Euler
    steps (the pinning test compares the adapter's Euler rollout with it)."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                           WanPipeline, WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_t5_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id)).eval()
    # head dim 12: Wan's 3-axis RoPE splits it 4 (frames) + 4 (height) + 4 (width)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                           latents_std=[1.5, 0.8, 1.2, 2.0], scale_factor_temporal=4, scale_factor_spatial=4)
    if euler:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:  # Wan2.1-T2V's scheduler_config.json
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=3.0, num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux1_kontext(seed: int = 0):
    """:func:`tests.helpers.tiny_edit_pipelines.build_flux1_kontext`."""
    from tests.helpers.tiny_edit_pipelines import build_flux1_kontext as build

    return build(seed)


def build_qwen_image_edit_plus(seed: int = 0):
    """:func:`tests.helpers.tiny_edit_pipelines.build_qwen_image_edit_plus`."""
    from tests.helpers.tiny_edit_pipelines import build_qwen_image_edit_plus as build

    return build(seed)


def build_wan_t2v_a14b(seed: int = 0, *, boundary_ratio: float = 0.5, euler: bool = False):
    """Wan2.2-A14B's layout on :func:`build_wan_t2v`'s parts: a second, differently initialised
    ``transformer_2`` (the low-noise expert) and ``boundary_ratio`` (0.5 here, so the generic tests'
    sigmas 0.8 / 0.35 straddle it; the real T2V-A14B has 0.875, I2V-A14B 0.9)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe = build_wan_t2v(seed, euler=euler)
    torch.manual_seed(seed + 7)
    low = WanTransformer3DModel(**pipe.transformer.config)
    two = WanPipeline(**{**pipe.components, "transformer_2": low}, boundary_ratio=boundary_ratio)
    two.set_progress_bar_config(disable=True)
    return two


def build_wan_i2v(seed: int = 0):
    """:func:`tests.helpers.tiny_video_pipelines.build_wan_i2v` (Wan2.1-I2V style)."""
    from tests.helpers.tiny_video_pipelines import build_wan_i2v as build

    return build(seed)


def build_wan_i2v_a14b(seed: int = 0):
    """:func:`tests.helpers.tiny_video_pipelines.build_wan_i2v_a14b` (Wan2.2-I2V-A14B style)."""
    from tests.helpers.tiny_video_pipelines import build_wan_i2v_a14b as build

    return build(seed)


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class TinyPipeline:
    """How to build and run one family's tiny pipeline in generic tests."""

    model_type: str
    pipeline_class: str  # the diffusers class (its own load_lora_weights is tested)
    build: Callable[..., Any]
    resolution: tuple[int, int]  # a small valid (height, width)
    uses_cfg: bool  # classifier-free guidance with negative prompts (False: guidance-distilled)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # model.options for the adapter
    condition_images: int = 0  # condition images per sample in generic tests (edit families)
    variant: str = ""  # a second layout of the same model_type (key "model_type-variant")

    @property
    def name(self) -> str:
        return f"{self.model_type}-{self.variant}" if self.variant else self.model_type

    def encode_kwargs(self, batch: int, seed: int = 0) -> dict[str, Any]:
        """What ``encode_prompts`` takes besides prompts for ``batch`` samples: for edit families
        ``images`` (distinct test images per sample, :mod:`tests.helpers.tiny_edit_pipelines`) and
        ``resolution``; nothing for text-only families."""
        if not self.condition_images:
            return {}
        from tests.helpers.tiny_edit_pipelines import condition_rows

        return {"images": condition_rows(batch, self.condition_images, seed), "resolution": self.resolution}

    @property
    def guidance_scale(self) -> float:
        """A guidance scale that acts: CFG weight 3 or FLUX.1-dev's embedded 3.5."""
        return 3.0 if self.uses_cfg else 3.5

    def save(self, directory: Path, seed: int = 0) -> Path:
        """Build and ``save_pretrained`` into ``directory`` (the adapter loads it from there)."""
        pipe = self.build(seed)
        if self.model_type == "sd3-5":
            from shared.toy.pipeline import save_toy_pipeline

            return save_toy_pipeline(pipe, directory)
        pipe.save_pretrained(directory)
        return Path(directory)

    def load_pipeline(self, directory: Path):
        """The plain diffusers pipeline from ``directory`` (``from_pretrained``)."""
        import diffusers

        from shared.models import MODELS

        cls = getattr(diffusers, self.pipeline_class)
        index = cls.load_config(directory)
        none = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        adapter = MODELS.get(self.model_type)  # components it builds itself (a processor without torchvision)
        none.update(adapter.preloaded_components(str(directory), {**adapter.option_defaults, **self.options}))
        pipe = cls.from_pretrained(directory, **none)
        pipe.set_progress_bar_config(disable=True)
        return pipe


TINY_PIPELINES: dict[str, TinyPipeline] = {
    p.name: p for p in (
        TinyPipeline("sd3-5", "StableDiffusion3Pipeline", build_sd3, (32, 32), uses_cfg=True),
        TinyPipeline("flux1", "FluxPipeline", build_flux1, (32, 32), uses_cfg=False,
                     options={"max_sequence_length": 16, "shift_resolution": 32}),
        TinyPipeline("z-image", "ZImagePipeline", build_z_image, (32, 32), uses_cfg=True,
                     options={"max_sequence_length": 32, "shift_resolution": 32}),
        TinyPipeline("qwen-image", "QwenImagePipeline", build_qwen_image, (32, 32), uses_cfg=True,
                     options={"max_sequence_length": 32, "shift_resolution": 32}),
        TinyPipeline("flux2", "Flux2Pipeline", build_flux2, (32, 32), uses_cfg=False,
                     options={"max_sequence_length": 48, "text_encoder_out_layers": [1, 2, 3],
                              "shift_resolution": 32}),
        TinyPipeline("flux2-klein", "Flux2KleinPipeline", build_flux2_klein, (32, 32), uses_cfg=True,
                     options={"max_sequence_length": 40, "text_encoder_out_layers": [1, 2, 3],
                              "shift_resolution": 32}),
        TinyPipeline("wan2_t2v", "WanPipeline", build_wan_t2v, (32, 32), uses_cfg=True,
                     options={"max_sequence_length": 16, "num_frames": 5}),
        TinyPipeline("wan2_t2v", "WanPipeline", build_wan_t2v_a14b, (32, 32), uses_cfg=True,
                     options={"max_sequence_length": 16, "num_frames": 5}, variant="a14b"),
        TinyPipeline("wan2_i2v", "WanImageToVideoPipeline", build_wan_i2v, (32, 32), uses_cfg=True,
                     options={"max_sequence_length": 16, "num_frames": 5}, condition_images=1),
        TinyPipeline("wan2_i2v", "WanImageToVideoPipeline", build_wan_i2v_a14b, (32, 32), uses_cfg=True,
                     options={"max_sequence_length": 16, "num_frames": 5}, condition_images=1, variant="a14b"),
        TinyPipeline("flux1-kontext", "FluxKontextPipeline", build_flux1_kontext, (32, 32), uses_cfg=False,
                     options={"max_sequence_length": 16, "shift_resolution": 32}, condition_images=1),
        TinyPipeline("qwen-image-edit-plus", "QwenImageEditPlusPipeline", build_qwen_image_edit_plus, (32, 32),
                     uses_cfg=True, options={"max_sequence_length": 96, "shift_resolution": 32},
                     condition_images=2),
    )
}


def tiny_train_config(spec: TinyPipeline, pipeline_dir: Path, root: Path, *, model: dict | None = None,
                      train: dict | None = None):
    """A validated config training ``spec``'s tiny pipeline for one small epoch under ``root``
    (``train.txt`` with :data:`PROMPTS`, or for edit families ``train.jsonl`` with
    ``spec.condition_images`` PNGs per row in ``images/``; ``brightness`` reward, no logging backend)."""
    from shared.config import parse_config

    data = Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    if spec.condition_images:
        from tests.helpers.tiny_edit_pipelines import write_edit_dataset

        write_edit_dataset(data, PROMPTS, spec.condition_images)
    else:
        (data / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    return parse_config({
        "output_dir": str(Path(root) / "runs"), "run_name": spec.model_type, "logging_backend": "none",
        "model": {"model_type": spec.model_type, "model_name_or_path": str(pipeline_dir),
                  "options": dict(spec.options), "lora_rank": 4, **(model or {})},
        "data": {"dataset_dir": str(data)},
        "train": {"resolution": list(spec.resolution), "num_inference_steps": 3, "group_size": 2,
                  "unique_sample_num_per_epoch": 2, "per_device_batch_size": 4,
                  "gradient_step_per_epoch": 1, "max_epochs": 1, "learning_rate": 1e-2,
                  "adam_weight_decay": 0.0, "guidance_scale": spec.guidance_scale,
                  **(train or {})},
        "eval": {"num_inference_steps": 2, "eval_freq": 0, "num_prompts": 2},
        "rewards": [{"reward_model": "brightness"}],
    })
