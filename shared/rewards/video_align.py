"""``videoalign``: VideoAlign's VideoReward (Liu et al. 2025, "Improving Video Generation with Human
Feedback"), the video reward of DanceGRPO's video runs. Pointwise, on whole videos.

A Qwen2-VL-2B model reads the video and a prompt template that holds the generation prompt and
three reward tokens, ``<|VQ_reward|>`` (visual quality), ``<|MQ_reward|>`` (motion quality) and
``<|TA_reward|>`` (text alignment); a linear head on the last hidden state at each reward token
gives that dimension's score. With the checkpoint's ``inference_config`` each score is
standardized, ``(s - mean) / std``, and ``Overall = VQ + MQ + TA``. The reward is one of the four
(``dimension``); DanceGRPO trains on ``VQ`` and ``MQ`` as two rewards -- two entries here, which
share one loaded model and one forward per video (:func:`shared_scorer`).

Reproduced as VideoAlign runs it (``inference.py`` with transformers 4.45):

* frames: sampled at ``fps`` (2 by the checkpoint's ``data_config``) from a video of ``video_fps``
  (the generator's frame rate, an option: 16 for Wan2.1, 24 for Wan2.2-TI2V-5B), at least 4 and an
  even count, evenly spaced (qwen-vl-utils' ``smart_nframes``; ``num_frames`` when the checkpoint
  fixes it); taken as 8-bit pixels (VideoAlign reads videos from files; DanceGRPO writes its
  rollouts to mp4 first, a lossy step not reproduced here) and resized as torchvision resizes
  uint8 frames (bicubic, antialiased, rounded back to 8 bits) so each side is a multiple of 28 within
  ``[128 * 28^2, max_frame_pixels]`` pixels (``smart_resize``); normalized with the base model's
  image mean and std and cut into Qwen2-VL's 2 x 14 x 14 patches (:func:`patchify`);
* text: the base model's chat template over one user turn (the video, then the filled prompt
  template), generation prompt added, ``<|video_pad|>`` repeated once per merged patch, padded on
  the right;
* positions: 0, 1, 2, ... for every token, video tokens included. VideoAlign's forward calls the
  language model without position ids, so transformers counts tokens (Qwen2-VL's 3-D M-RoPE
  reduces to plain RoPE) -- and that is what its head was trained on.

The checkpoint (``checkpoint``: a local folder or hub id, default ``KwaiVGI/VideoReward``) is read by
:mod:`shared.rewards.video_align_ckpt`; the base model (``model_config.json``'s
``model_name_or_path``, default ``Qwen/Qwen2-VL-2B-Instruct``; ``base_model`` overrides it) loads
with ``from_pretrained``, gains the three tokens, and takes the checkpoint's tensors with its LoRA
merged. VideoAlign's prompt template is not shipped with flowrl: ``template`` points at its
``prompt_template.py`` (or a text file holding the prompt). The model runs in ``dtype``; the head
and the standardization in float32 (VideoAlign's bf16 head rounds raw scores to bf16 steps). Not checked against the released weights (none can be
downloaded here); tests compare with an unmerged peft model built from the same files.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.rewards.base import RewardModel
from shared.rewards.video_align_ckpt import (
    DIMENSIONS,
    REWARD_TOKENS,
    TEMPLATE_NAMES,
    VideoAlignSettings,
    describe,
    fill_template,
    load_weights,
    merge_lora,
    read_settings,
    read_template,
    step_folder,
)

CHECKPOINT = "KwaiVGI/VideoReward"
FRAME_FACTOR = 2
MIN_FRAMES, MAX_FRAMES = 4, 768
SIZE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
MAX_RATIO = 200
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SEEN_MAX = 4096
OUTPUTS = (*DIMENSIONS, "Overall")


# --- frames ----------------------------------------------------------------------------------


def frame_count(total: int, *, video_fps: float, fps: float | None = None, num_frames: float | None = None) -> int:
    """How many frames of a ``total``-frame video at ``video_fps`` the model sees (qwen-vl-utils'
    ``smart_nframes``): ``num_frames`` rounded to even, or ``total / video_fps * fps`` clamped to
    ``[4, min(768, total)]`` (even bounds) and rounded to even (Python's round, halves to even);
    never more than ``total``. :class:`ValueError` when that leaves fewer than 2."""
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(total / video_fps * fps, low), high)
        n = round(n / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total)
    if n < FRAME_FACTOR:
        raise ValueError(f"a video of {total} frame(s) gives {n} frame(s) to score; VideoAlign needs at least "
                         f"{FRAME_FACTOR}. Fix: generate videos of at least {FRAME_FACTOR} frames")
    return int(n)


def frame_indices(total: int, n: int) -> list[int]:
    """``n`` evenly spaced frame indices of ``[0, total - 1]``, rounded (halves to even)."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def smart_resize(height: int, width: int, *, factor: int = SIZE_FACTOR, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' frame size: each side rounded to a multiple of ``factor`` (at least
    ``factor``); if that exceeds ``max_pixels`` both sides shrink by ``sqrt(h w / max_pixels)`` and
    round down, if below ``min_pixels`` grow by ``sqrt(min_pixels / (h w))`` and round up."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"frames of {height}x{width}: the aspect ratio must be below {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def sample_frames(video: torch.Tensor, *, video_fps: float, fps: float | None, num_frames: float | None,
                  max_pixels: int) -> torch.Tensor:
    """``video [F, 3, H, W]`` in ``[0, 1]`` (any device) -> the frames the model sees, ``[n, 3, h, w]``
    float32 on the CPU in ``[0, 1]``: :func:`frame_indices` of :func:`frame_count` (only those are
    copied), as 8-bit frames (VideoAlign reads videos from files), resized to :func:`smart_resize`
    the way torchvision resizes uint8 tensors (bicubic with antialiasing, then rounded and clamped
    back to 8 bits)."""
    n = frame_count(video.shape[0], video_fps=video_fps, fps=fps, num_frames=num_frames)
    frames = quantize(video.detach()[frame_indices(video.shape[0], n)].float().cpu())
    h, w = smart_resize(frames.shape[-2], frames.shape[-1], max_pixels=max_pixels)
    if (h, w) != tuple(frames.shape[-2:]):
        frames = quantize(F.interpolate(frames, size=(h, w), mode="bicubic", antialias=True, align_corners=False))
    return frames


def quantize(frames: torch.Tensor) -> torch.Tensor:
    """Values in ``[0, 1]`` rounded to the 256 levels of 8-bit pixels (clamped first)."""
    return (frames.clamp(0, 1) * 255).round() / 255


def patchify(frames: torch.Tensor, *, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalized frames ``[T, C, h, w]`` -> Qwen2-VL's flat patches ``[t * gh * gw, C * temporal *
    patch * patch]`` and the grid ``(t, gh, gw)``, ``t = T / temporal`` (the last frame repeated up
    to a multiple of ``temporal``), ``gh = h / patch``. Rows run over time, then ``merge x merge``
    blocks in raster order, then the cells of each block; a row holds channel, then frame within
    the temporal patch, then pixel row and column -- the order the vision tower's 3-D patch
    embedding and its patch merger read."""
    if pad := -frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    T, C, h, w = frames.shape
    t, gh, gw = T // temporal, h // patch, w // patch
    if gh % merge or gw % merge:
        raise ValueError(f"frames of {h}x{w} do not split into {merge}x{merge} blocks of {patch}-pixel patches")
    x = frames.reshape(t, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, block row, block col, cell row, cell col, C, frame, y, x
    return x.reshape(t * gh * gw, C * temporal * patch * patch), (t, gh, gw)


# --- the model -------------------------------------------------------------------------------


class VideoAlignNet(nn.Module):
    """Qwen2-VL with VideoAlign's head: ``forward(input_ids [B, L], attention_mask [B, L],
    pixel_values_videos [P, D], video_grid_thw [B, 3])`` -> raw scores ``[B, 3]`` float32 (VQ, MQ,
    TA: the head's output at each reward token; a 3-wide head gives each token its own column)."""

    def __init__(self, vlm, head: nn.Linear, token_ids: tuple[int, int, int]) -> None:
        super().__init__()
        self.vlm, self.head, self.token_ids = vlm, head, token_ids

    def forward(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw) -> torch.Tensor:
        model = self.vlm.model
        embeds = model.get_input_embeddings()(input_ids)
        video = model.get_video_features(pixel_values_videos, video_grid_thw).pooler_output
        video = torch.cat(list(video)) if isinstance(video, (list, tuple)) else video
        mask = (input_ids == self.vlm.config.video_token_id).unsqueeze(-1).expand_as(embeds)
        if int(mask[..., 0].sum()) != video.shape[0]:
            raise ValueError(f"{int(mask[..., 0].sum())} video tokens in the text for {video.shape[0]} video "
                             f"embeddings")
        embeds = embeds.masked_scatter(mask, video.to(embeds.dtype))
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        rows = []
        for token in self.token_ids:
            at = (input_ids == token).int().argmax(dim=1)  # each reward token occurs once per row
            rows.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), at])
        values = self.head(torch.stack(rows, dim=1).float())  # [B, 3, out]
        return values[..., 0] if values.shape[-1] == 1 else values.diagonal(dim1=1, dim2=2)


def _hub_folder(spec: str, who: str) -> Path:
    """``spec`` as a local folder, or a hub repository downloaded (or found in the cache)."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    from shared.rewards.clip_rewards import check_pretrained

    repo = check_pretrained(spec, option="checkpoint", who=who)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo))
    except Exception as e:  # noqa: BLE001 - offline, no such repo: one teaching message
        raise FileNotFoundError(f"{who}: checkpoint '{spec}' is not a local folder, and downloading hub repository "
                                f"'{repo}' failed ({type(e).__name__}: {e}). Fix: download KwaiVGI/VideoReward where "
                                f"flowrl runs and point checkpoint at its folder") from e


class VideoAlignScorer:
    """One loaded VideoAlign model and the scores it has computed: ``raw(videos, prompts)`` ->
    ``[B, 3]`` float32 (VQ, MQ, TA before standardization), each (video, prompt) computed once
    while it is among the newest ``SEEN_MAX`` (so entries for different dimensions, and
    evaluation's score-then-details, share one forward)."""

    def __init__(self, folder: Path, settings: VideoAlignSettings, step: int, base_model: str, template: str,
                 device: torch.device, dtype: torch.dtype, who: str) -> None:
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

        from shared.rewards.clip_rewards import load_pretrained

        self.settings, self.template, self.device, self.dtype, self.who = settings, template, device, dtype, who
        weights, lora = load_weights(step_folder(folder, step, who), who)
        tokenizer = load_pretrained(lambda p: AutoTokenizer.from_pretrained(p, padding_side="right"), base_model,
                                    option="base_model", who=who)
        tokenizer.add_tokens(list(REWARD_TOKENS), special_tokens=True)  # appended: ids len(tokenizer)...
        self.token_ids = tuple(tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS)))
        # the processor's template, as VideoAlign's processor.apply_chat_template reads it, else the tokenizer's
        self.chat_template = _processor_chat_template(base_model) or tokenizer.chat_template
        if not self.chat_template:
            raise ValueError(f"{who}: base_model '{base_model}' has no chat template (tokenizer or processor). Fix: "
                             f"use Qwen2-VL-2B-Instruct's folder as it is on the hub")
        self.tokenizer = tokenizer
        vlm = load_pretrained(lambda p: Qwen2VLForConditionalGeneration.from_pretrained(p, dtype=dtype),
                              base_model, option="base_model", who=who)
        head = weights.pop("rm_head.weight", None)
        if head is None:
            raise ValueError(f"{who}: the checkpoint has no rm_head.weight (its tensors: {describe(weights)}), so it "
                             f"is not a VideoAlign reward model")
        embed = weights.get("model.language_model.embed_tokens.weight")
        if embed is None or embed.shape[0] != len(tokenizer):  # training resized it to len(tokenizer)
            raise ValueError(f"{who}: the checkpoint does not hold the embeddings of the reward tokens "
                             f"{REWARD_TOKENS} as base_model's tokenizer numbers them (ids {self.token_ids}, "
                             f"{len(tokenizer)} tokens; the checkpoint's embedding table: "
                             f"{'none' if embed is None else embed.shape[0]} rows). Fix: use base_model = the "
                             f"model it was trained from")
        vlm.resize_token_embeddings(embed.shape[0], mean_resizing=False)
        params = dict(vlm.named_parameters())  # tied weights appear once (the embedding)
        tied = getattr(vlm.config, "tie_word_embeddings", False)
        unknown = [k for k in weights if k not in params and not (tied and k == "lm_head.weight")]
        if unknown:
            raise ValueError(f"{who}: checkpoint tensors {describe(dict.fromkeys(unknown))} have no place in base "
                             f"model '{base_model}'. Fix: use the base model it was trained from")
        with torch.no_grad():
            for key, value in weights.items():
                if key not in params:
                    continue  # the tied output head: the embedding, written under its own name
                if tuple(value.shape) != tuple(params[key].shape):
                    raise ValueError(f"{who}: checkpoint tensor {key} is {tuple(value.shape)}, the base model's "
                                     f"{tuple(params[key].shape)}. Fix: use the base model it was trained from")
                params[key].copy_(value.to(params[key].dtype))
        heads = {"rm_head.weight": head}
        merge_lora({**{k: p.data for k, p in params.items()}, **heads},
                   {k: v for k, v in lora.items() if not k.startswith("lm_head.")},  # (never reaches a score)
                   settings.lora_scale, who)
        head = heads["rm_head.weight"]
        vlm.config.pad_token_id = tokenizer.pad_token_id
        head_layer = nn.Linear(head.shape[1], head.shape[0], bias=False)
        head_layer.weight.data.copy_(head.float())
        self.net = VideoAlignNet(vlm.to(device), head_layer.to(device), self.token_ids).eval()
        self.net.requires_grad_(False)
        vision = vlm.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.mean, self.std = _image_stats(base_model)
        self._seen: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def frames(self, videos: torch.Tensor, video_fps: float) -> list[torch.Tensor]:
        """Each video's frames as the model sees them (:func:`sample_frames`)."""
        s = self.settings
        return [sample_frames(v, video_fps=video_fps, fps=s.fps, num_frames=s.num_frames, max_pixels=s.max_pixels)
                for v in videos]

    def inputs(self, videos: torch.Tensor | list[torch.Tensor], prompts: list[str],
               video_fps: float | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for ``videos [B, F, 3, H, W]`` in ``[0, 1]`` at ``video_fps`` (or for the
        :meth:`frames` of each, a list, with ``video_fps`` None) and their prompts."""
        if video_fps is not None:
            videos = self.frames(videos, video_fps)
        patches, grids, texts = [], [], []
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        for frames, prompt in zip(videos, prompts):
            flat, grid = patchify((frames - mean) / std, patch=self.patch, merge=self.merge, temporal=self.temporal)
            patches.append(flat)
            grids.append(grid)
            message = [{"role": "user", "content": [{"type": "video"},
                                                    {"type": "text", "text": fill_template(self.template, prompt)}]}]
            text = self.tokenizer.apply_chat_template(message, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            if text.count("<|video_pad|>") != 1:
                raise ValueError(f"{self.who}: the chat template placed {text.count('<|video_pad|>')} video "
                                 f"placeholders for one video. Fix: use Qwen2-VL's chat template")
            tokens = grid[0] * grid[1] * grid[2] // self.merge ** 2
            texts.append(text.replace("<|video_pad|>", "<|video_pad|>" * tokens))
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        for row, prompt in zip(batch["input_ids"], prompts):
            counts = [int((row == t).sum()) for t in self.token_ids]
            if counts != [1, 1, 1]:  # e.g. a prompt that spells out a reward token
                raise ValueError(f"{self.who}: prompt {prompt!r} gives the reward tokens {REWARD_TOKENS} "
                                 f"{counts} times; each must occur once. Fix: remove reward tokens from the prompt")
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device),
                "pixel_values_videos": torch.cat(patches).to(self.device, self.dtype),
                "video_grid_thw": torch.tensor(grids, device=self.device)}

    @torch.no_grad()
    def raw(self, videos: torch.Tensor, prompts: list[str], video_fps: float) -> torch.Tensor:
        frames = self.frames(videos, video_fps)  # the key: what the model sees, not the whole video
        keys = [_key(f, p) for f, p in zip(frames, prompts)]
        with self._lock:
            todo = [i for i, k in enumerate(keys) if k not in self._seen]
            if todo:
                fresh = self.net(**self.inputs([frames[i] for i in todo], [prompts[i] for i in todo])).float().cpu()
                for i, row in zip(todo, fresh):
                    self._seen[keys[i]] = row
                while len(self._seen) > SEEN_MAX:
                    self._seen.popitem(last=False)
            return torch.stack([self._seen[k] for k in keys])

    def scores(self, videos: torch.Tensor, prompts: list[str], video_fps: float, normalize: bool) -> dict[str, torch.Tensor]:
        """``{VQ, MQ, TA, Overall: [B]}`` (standardized with the checkpoint's statistics when
        ``normalize``; Overall is their sum)."""
        raw = self.raw(videos, prompts, video_fps)
        out = {}
        for j, d in enumerate(DIMENSIONS):
            value = raw[:, j]
            if normalize and self.settings.norm is not None:
                mean, std = self.settings.norm[d]
                value = (value - mean) / std
            out[d] = value
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out


def _key(frames: torch.Tensor, prompt: str) -> bytes:
    """A digest of the frames a model sees (float32 CPU ``[n, 3, h, w]``) and the prompt."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(frames.shape)).encode())
    h.update(frames.contiguous().numpy().tobytes())
    h.update(prompt.encode("utf-8"))
    return h.digest()


def _image_stats(base_model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The base model's image mean and std (its ``preprocessor_config.json``), else OpenAI CLIP's."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        proc = Qwen2VLImageProcessorPil.from_pretrained(base_model)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError):
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _processor_chat_template(base_model: str) -> str | None:
    """The chat template a processor folder keeps beside the tokenizer (``chat_template.jinja`` or
    ``chat_template.json``)."""
    import json

    from huggingface_hub import hf_hub_download

    for name in ("chat_template.jinja", "chat_template.json"):
        path = Path(base_model) / name
        if not path.is_file():
            try:
                path = Path(hf_hub_download(repo_id=base_model, filename=name))
            except Exception:  # noqa: BLE001 - not there / offline: try the next
                continue
        text = path.read_text(encoding="utf-8")
        return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


_SCORERS: dict[tuple, VideoAlignScorer] = {}
_SCORERS_LOCK = threading.Lock()


def shared_scorer(checkpoint: str, step: int, base_model: str | None, template: str | None,
                  template_name: str | None, device: torch.device, dtype: torch.dtype, who: str) -> VideoAlignScorer:
    """The :class:`VideoAlignScorer` of these settings, built once per process."""
    folder = _hub_folder(checkpoint, who)
    settings = read_settings(folder, who)
    name = template_name or TEMPLATE_NAMES.get(settings.template_type)
    if name is None:
        raise ValueError(f"{who}: the checkpoint was trained with prompt_template_type "
                         f"'{settings.template_type}', which has no reward tokens; flowrl runs "
                         f"{', '.join(TEMPLATE_NAMES)}. Fix: set template_name to the constant to read")
    text = read_template(template, name, who)
    base = base_model or settings.base_model
    key = (str(folder.resolve()), step, base, text, str(device), str(dtype))
    with _SCORERS_LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = VideoAlignScorer(folder, settings, step, base, text, device, dtype, who)
        return _SCORERS[key]


class VideoAlign(RewardModel):
    """VideoAlign's VideoReward (module docstring): one of VQ, MQ, TA or Overall of each video.

    Args:
        checkpoint: VideoReward's folder (``model_config.json`` and ``checkpoint-*/``), local or a hub id.
        step: which ``checkpoint-<step>``; -1 = the highest.
        template: VideoAlign's ``prompt_template.py``, or a text file with the prompt (``{text_prompt}``
            where the video's prompt goes, and the three reward tokens).
        template_name: the constant to read from a ``.py`` template; default: the one of the
            checkpoint's ``prompt_template_type``.
        base_model: the Qwen2-VL it was trained from; default: ``model_config.json``'s.
        dimension: ``VQ``, ``MQ``, ``TA`` or ``Overall`` (their sum).
        video_fps: the frame rate of the scored videos (Wan2.1: 16; Wan2.2-TI2V-5B: 24).
        normalize: standardize with the checkpoint's ``inference_config`` (VideoAlign's ``use_norm``).
    """

    kind = "pointwise"
    video = "native"

    def __init__(self, *, checkpoint: str = CHECKPOINT, step: int = -1, template: str | None = None,
                 template_name: str | None = None, base_model: str | None = None, dimension: str = "Overall",
                 video_fps: float = 16.0, normalize: bool = True, **options) -> None:
        super().__init__(**options)
        names = {d.lower(): d for d in OUTPUTS}
        if str(dimension).lower() not in names:
            raise ValueError(f"{self.name}: dimension '{dimension}' is not one of {', '.join(OUTPUTS)}")
        if not video_fps or video_fps <= 0:
            raise ValueError(f"{self.name}: video_fps must be the scored videos' frame rate (> 0), got {video_fps}")
        self.dimension, self.video_fps, self.normalize = names[str(dimension).lower()], float(video_fps), normalize
        self.scorer = shared_scorer(str(checkpoint), int(step), base_model, template, template_name,
                                    self.device, self.dtype, self.name)

    @property
    def name(self) -> str:
        return "videoalign"

    def _videos(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 5:
            raise ValueError(f"{self.name} scores videos [B, F, 3, H, W]; got {tuple(images.shape)}. Fix: use it with "
                             f"a video model (wan2_t2v, wan2_i2v), or an image reward for images")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} videos")
        return images

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = self.scorer.scores(self._videos(images, prompts), prompts, self.video_fps, self.normalize)
        return out[self.dimension]

    def details(self, images: torch.Tensor, prompts: list[str], **inputs) -> dict[str, torch.Tensor]:
        """Every dimension (``VQ``, ``MQ``, ``TA``, ``Overall``) of each video."""
        return self.scorer.scores(self._videos(images, prompts), prompts, self.video_fps, self.normalize)
