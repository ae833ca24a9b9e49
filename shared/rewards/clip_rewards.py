"""Learned CLIP-family rewards: ``PickScore``, ``PickScore_Rank`` and ``CLIP``.

All three embed the image and the prompt with a ``transformers`` ``CLIPModel`` and compare
the L2-normalized embeddings:

* ``PickScore`` (pointwise): ``logit_scale * cos(image, text) / divisor`` with the PickScore_v1
  model (CLIP-H fine-tuned on Pick-a-Pic). ``divisor`` defaults to 26, the convention of
  Flow-GRPO and Flow-Factory (``reference/flow-factory.md`` §5.1), so reward curves read the same
  as theirs (typical values 0.8-0.9); ``divisor: 1`` gives the raw PickScore of the paper
  (typically 20-23). The division is a constant scale: group-normalized advantages do not change.
* ``PickScore_Rank`` (groupwise): the PickScore rank of each sample within its prompt group,
  mapped to ``[0, 1]`` by :func:`rank_in_group` (ties share their average rank, so the result
  does not depend on the order of the group).
* ``CLIP`` (pointwise): the plain cosine ``cos(image, text)`` in ``[-1, 1]`` with
  ``openai/clip-vit-large-patch14`` (Flow-Factory's convention; Flow-GRPO's ``clip_score``
  reports ``logit_scale * cos / 30`` instead, an affine change that group-normalized advantages
  also ignore).

Images arrive as float ``[B, 3, H, W]`` in ``[0, 1]`` on any device and are preprocessed as
tensors by :class:`ClipImageTransform` (resize, center-crop, normalize, read from the
processor's ``preprocessor_config.json``): no PIL round trip, no uint8 quantization. The models
run under ``no_grad`` in the configured ``dtype``; embeddings are normalized in float32.

Models and processors load with ``from_pretrained`` from a local folder or a hub id; the
processor folder supplies the tokenizer and ``preprocessor_config.json``. PickScore's processor is
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (as its authors and the peers use it); for the others the
processor defaults to the model folder.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from shared.rewards.base import REWARDS, RewardModel

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"

_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w\-.]*(/[\w\-.]+)?$")
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes; others fall back to bicubic


# --- loading ---------------------------------------------------------------------------------


def check_pretrained(path_or_id: str, *, option: str, who: str) -> str:
    """``path_or_id`` if it is an existing local path or could be a hub id (``name`` or
    ``org/name``); otherwise :class:`FileNotFoundError` naming ``option`` and the fix."""
    path_or_id = str(path_or_id)
    if Path(path_or_id).expanduser().exists():
        return str(Path(path_or_id).expanduser())
    if _HUB_ID.match(path_or_id):
        return path_or_id
    raise FileNotFoundError(
        f"{who}: {option} '{path_or_id}' is not an existing local path, and it is not a Hugging Face "
        f"Hub id like 'org/name' either. Fix: point {option} at a folder written by save_pretrained "
        f"(check the path from the directory you run in), or give a hub id."
    )


def load_pretrained(loader: Callable[[str], Any], path_or_id: str, *, option: str, who: str) -> Any:
    """``loader(path_or_id)`` with a clear error when neither a local folder nor the hub has it."""
    path_or_id = check_pretrained(path_or_id, option=option, who=who)
    try:
        return loader(path_or_id)
    except (OSError, ValueError) as e:
        raise OSError(
            f"{who}: could not load {option} '{path_or_id}': {e}\nFix: set {option} to a local folder "
            f"written by save_pretrained, or to a hub id that is in the local Hugging Face cache "
            f"(HF_HOME) or downloadable from this machine."
        ) from e


def resolve_file(spec: str, *, option: str, who: str, fix: str) -> Path:
    """A local file, or a hub file written ``owner/repo/path/in/repo`` (downloaded, or found in the
    Hugging Face cache). :class:`FileNotFoundError` naming ``option`` and ending with ``fix`` when it
    is neither, or the download fails (offline, no such repo or file)."""
    spec = str(spec)
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    parts = spec.split("/")
    if len(parts) >= 3 and not local.exists() and not local.is_absolute() and not spec.startswith((".", "~")):
        from huggingface_hub import hf_hub_download

        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        check_pretrained(repo_id, option=f"{option} (its 'owner/repo' part)", who=who)
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=filename))
        except Exception as e:  # noqa: BLE001 - offline, missing repo or file: one teaching message
            raise FileNotFoundError(
                f"{who}: {option} '{spec}' is not a local file, and downloading '{filename}' from hub repo "
                f"'{repo_id}' failed ({type(e).__name__}: {e}).\nFix: {fix}") from e
    raise FileNotFoundError(f"{who}: {option} '{spec}' is not a file, nor 'owner/repo/file' on the Hugging Face "
                            f"Hub. Fix: {fix}")


def load_torch_state(path: str | Path, *, option: str, who: str) -> dict[str, Any]:
    """A torch checkpoint loaded with ``weights_only`` on the CPU (tensors and plain values only:
    flowrl unpickles no objects); a refused object becomes a :class:`ValueError` saying how to
    re-save the file."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refusing an object: UnpicklingError
        if type(e).__name__ != "UnpicklingError":
            raise
        raise ValueError(f"{who}: {option} '{path}' holds more than tensors and plain values, which flowrl does "
                         f"not unpickle ({e}). Fix: load it once where you trust it and save its state dict "
                         f"alone (torch.save(torch.load(...)['state_dict'], ...)).") from None


def no_random_init():
    """A context in which ``transformers`` models are built without their random initialization
    (for weights that all come from a checkpoint next: a ViT-H costs seconds to initialize)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _size_hw(size: Any, *, square: bool) -> tuple[int, int] | int:
    """A processor ``size`` entry -> ``(h, w)``, or an int shortest edge (``square=False``)."""
    if isinstance(size, int):
        return (size, size) if square else size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return (size["shortest_edge"],) * 2 if square else int(size["shortest_edge"])
    raise ValueError(f"unsupported image processor size {size!r}: expected an int, "
                     f"{{'height', 'width'}} or {{'shortest_edge'}}")


@dataclasses.dataclass(frozen=True)
class ClipImageTransform:
    """CLIP image preprocessing on tensors, as ``CLIPImageProcessor`` (torchvision backend) does.

    ``[B, 3, H, W]`` float in ``[0, 1]`` (= uint8 / 255, so the processor's rescale is implied)
    -> resize (shortest edge to ``resize`` keeping the aspect ratio, ``int(size * long / short)``
    for the long edge, or to ``(h, w)``), antialiased, clamped back to ``[0, 1]`` as the uint8
    path clips; -> center crop ``crop`` (top/left ``int((H - h) / 2)``, zero padding if the image
    is smaller) -> ``(x - mean) / std``. Output float32 ``[B, 3, crop_h, crop_w]``.

    ``letterbox=True`` replaces resize and crop with OpenCLIP's ``ResizeMaxSize`` (what HPS v2
    scores with): the LONGEST edge is resized to the crop size (the other to ``round(edge *
    scale)``) and the rest padded with black, the image centred (left / top get half the padding,
    rounded down). Square images are resized alike either way.
    """

    resize: tuple[int, int] | int | None  # None: no resize; int: shortest edge
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "bicubic"
    letterbox: bool = False
    round_crop: bool = False  # crop offsets int(round(...)) as torchvision's CenterCrop (ImageReward's), not int(...)

    @classmethod
    def from_config(cls, config: dict) -> "ClipImageTransform":
        """From a ``preprocessor_config.json`` dict (old int sizes included)."""
        resize = _size_hw(config["size"], square=False) if config.get("do_resize", True) else None
        crop = _size_hw(config["crop_size"], square=True) if config.get("do_center_crop", True) else None
        normalize = config.get("do_normalize", True)
        return cls(resize=resize, crop=crop,
                   mean=tuple(config["image_mean"]) if normalize else (0.0, 0.0, 0.0),
                   std=tuple(config["image_std"]) if normalize else (1.0, 1.0, 1.0),
                   mode=_RESAMPLE.get(int(config.get("resample", 3)), "bicubic"))

    @classmethod
    def from_pretrained(cls, path_or_id: str) -> "ClipImageTransform":
        from transformers.image_processing_base import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(path_or_id)
        return cls.from_config(config)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize step."""
        if self.resize is None:
            return height, width
        if isinstance(self.resize, tuple):
            return self.resize
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP preprocessing expects RGB images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if self.letterbox:
            return self._normalize(self._letterbox(x))
        size = self.output_size(*x.shape[-2:])
        x = self._resize(x, size)
        if self.crop is not None:
            x = _center_crop(x, *self.crop, round_offsets=self.round_crop)
        return self._normalize(x)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if size == tuple(x.shape[-2:]):
            return x
        smooth = self.mode in ("bilinear", "bicubic")
        return F.interpolate(x, size=size, mode=self.mode, antialias=smooth,
                             align_corners=False if smooth else None).clamp(0.0, 1.0)

    def _letterbox(self, x: torch.Tensor) -> torch.Tensor:
        side = max(self.crop) if self.crop is not None else max(x.shape[-2:])
        h, w = x.shape[-2:]
        scale = side / max(h, w)
        x = self._resize(x, (round(h * scale), round(w * scale)))
        ph, pw = side - x.shape[-2], side - x.shape[-1]
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _center_crop(x: torch.Tensor, height: int, width: int, round_offsets: bool = False) -> torch.Tensor:
    h, w = x.shape[-2:]
    if height > h or width > w:  # pad with zeros (black) first, as the processors do
        ph, pw = max(height - h, 0), max(width - w, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = x.shape[-2:]
    offset = (lambda extra: int(round(extra / 2.0))) if round_offsets else (lambda extra: int(extra / 2.0))  # noqa: E731
    top, left = offset(h - height), offset(w - width)
    return x[..., top:top + height, left:left + width]


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output``
    holds the projected features (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --- the shared backbone ------------------------------------------------------------------------


class ClipBackbone(RewardModel):
    """A frozen ``CLIPModel`` with tensor preprocessing and normalized embeddings.

    Subclasses set ``default_model`` / ``default_processor`` (``None``: the model's folder) and
    ``uses_text`` (False drops the text tower after loading, to save memory).

    Args:
        model_name_or_path: local folder or hub id of the ``CLIPModel`` weights.
        processor_name_or_path: local folder or hub id holding the tokenizer and
            ``preprocessor_config.json``.
    """

    default_model: ClassVar[str] = CLIP_MODEL
    default_processor: ClassVar[str | None] = None
    uses_text: ClassVar[bool] = True

    def __init__(self, *, model_name_or_path: str | None = None,
                 processor_name_or_path: str | None = None, **options) -> None:
        super().__init__(**options)
        from transformers import AutoTokenizer

        self.model_name_or_path = model_name_or_path or self.default_model
        self.processor_name_or_path = (processor_name_or_path or self.default_processor
                                       or self.model_name_or_path)
        who = self.name
        model = self.load_model()
        self.transform = load_pretrained(ClipImageTransform.from_pretrained, self.processor_name_or_path,
                                         option="processor_name_or_path", who=who)
        if self.uses_text:
            self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.processor_name_or_path,
                                             option="processor_name_or_path", who=who)
            self.max_length = min(self.tokenizer.model_max_length,
                                  model.config.text_config.max_position_embeddings)
        else:
            model.text_model = model.text_projection = None  # get_image_features needs neither
        self.model = model.eval().requires_grad_(False).to(device=self.device, dtype=self.dtype)

    def load_model(self):
        """The ``CLIPModel`` (``from_pretrained(model_name_or_path)``; a subclass may build it otherwise)."""
        from transformers import CLIPModel

        return load_pretrained(CLIPModel.from_pretrained, self.model_name_or_path, option="model_name_or_path",
                               who=self.name)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> pixel values ``[B, 3, h, w]`` on the model's device/dtype."""
        return self.transform(images.to(self.device)).to(self.dtype)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Padded, truncated ``input_ids`` / ``attention_mask`` ``[B, L]`` on the model's device."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values -> L2-normalized float32 image embeddings ``[B, D]``."""
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens -> L2-normalized float32 text embeddings ``[B, D]``."""
        return F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``cos(image_i, text_i)`` for each pair: ``[B]`` float32 in [-1, 1]."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        img = self.image_embeds(self.preprocess(images))
        txt = self.text_embeds(self.tokenize(prompts))
        return (img * txt).sum(dim=-1)

    def logit_scale(self) -> float:
        """CLIP's learned temperature ``exp(logit_scale)`` (100 for released CLIP/PickScore)."""
        return float(self.model.logit_scale.float().exp())


# --- the rewards --------------------------------------------------------------------------------


@REWARDS.register("pickscore")
class PickScore(ClipBackbone):
    """PickScore: ``logit_scale * cos(image, text) / divisor``. Pointwise.

    Args:
        divisor: 26 (default) as Flow-GRPO / Flow-Factory; 1 for the raw PickScore.
        model_name_or_path: default ``yuvalkirstain/PickScore_v1``.
        processor_name_or_path: default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
    """

    kind = "pointwise"
    default_model = PICKSCORE_MODEL
    default_processor = PICKSCORE_PROCESSOR

    def __init__(self, *, divisor: float = 26.0, **options) -> None:
        if not divisor > 0:
            raise ValueError(f"{type(self).__name__}: divisor must be > 0, got {divisor}")
        super().__init__(**options)
        self.divisor = float(divisor)

    def raw_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Undivided PickScore ``logit_scale * cos``: ``[B]`` float32."""
        return self.logit_scale() * self.cosine(images, prompts)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.raw_scores(images, prompts) / self.divisor


def rank_in_group(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores [K]`` mapped to ``[0, 1]``: ``rank / (K - 1)``, ``rank`` counted from 0
    for the lowest score.

    Ties share the average of the ranks they span (``[1, 5, 5, 9]`` -> ranks ``[0, 1.5, 1.5, 3]``
    -> ``[0, .5, .5, 1]``), so the result is deterministic and permuting the group permutes the
    output the same way. NaN scores abstain (NaN out) and are ranked past; a group with one valid
    score gives it 0.5 (the middle of the range). Flow-Factory's ``pickscore_rank`` uses
    ``rank / K`` with arbitrary tie order; the two differ by a constant factor for a fixed ``K``,
    which group-normalized advantages ignore.
    """
    s = scores.detach().double().cpu()
    valid = ~torch.isnan(s)
    out = torch.full(s.shape, float("nan"), dtype=torch.float32)
    v = s[valid]
    k = v.numel()
    if k == 0:
        return out
    if k == 1:
        out[valid] = 0.5
        return out
    below = (v[None, :] < v[:, None]).sum(dim=1).double()  # how many score lower
    ties = (v[None, :] == v[:, None]).sum(dim=1).double() - 1  # how many others score the same
    out[valid] = ((below + ties / 2) / (k - 1)).float()
    return out


@REWARDS.register("pickscore_rank")
class PickScoreRank(ClipBackbone):
    """PickScore rank within the prompt group, in ``[0, 1]`` (see :func:`rank_in_group`). Groupwise.

    Args:
        chunk_size: images per forward pass inside one group (a group is scored whole).
        model_name_or_path, processor_name_or_path: as :class:`PickScore`.
    """

    kind = "groupwise"
    default_model = PICKSCORE_MODEL
    default_processor = PICKSCORE_PROCESSOR

    def __init__(self, *, chunk_size: int = 32, **options) -> None:
        if chunk_size < 1:
            raise ValueError(f"{type(self).__name__}: chunk_size must be >= 1, got {chunk_size}")
        super().__init__(**options)
        self.chunk_size = int(chunk_size)

    def raw_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Undivided PickScore of each member, in chunks of ``chunk_size``: ``[K]`` float32."""
        parts = [self.cosine(images[s:s + self.chunk_size], prompts[s:s + self.chunk_size])
                 for s in range(0, images.shape[0], self.chunk_size)]
        return self.logit_scale() * torch.cat(parts)

    def score_group(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return rank_in_group(self.raw_scores(images, list(prompts)))


@REWARDS.register("clip")
class CLIPScore(ClipBackbone):
    """CLIP image-text cosine similarity in ``[-1, 1]``. Pointwise.

    Args:
        model_name_or_path: default ``openai/clip-vit-large-patch14``.
        processor_name_or_path: default: the model's folder.
    """

    kind = "pointwise"
    default_model = CLIP_MODEL

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.cosine(images, prompts)


__all__ = ["ClipBackbone", "ClipImageTransform", "PickScore", "PickScoreRank", "CLIPScore",
           "rank_in_group", "check_pretrained", "load_pretrained"]
