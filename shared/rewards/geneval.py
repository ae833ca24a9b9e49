"""``geneval``: GenEval's compositional check (object presence, counts, colors, positions) as a
reward, driven by each dataset row's metadata -- Flow-GRPO's headline task.

A row of a GenEval dataset (Flow-GRPO's ``dataset/geneval``, GenEval's ``evaluation_metadata.jsonl``)
carries, beside its prompt, what the image must show::

    {"tag": "color_attr", "prompt": "a photo of a red bench and a blue dog",
     "include": [{"class": "bench", "count": 1, "color": "red"},
                 {"class": "dog", "count": 1, "color": "blue"}]}
    {"tag": "counting", "prompt": "a photo of three cats",
     "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
    {"tag": "position", "prompt": "a photo of a dog right of a bench",
     "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}

flowrl's data loader hands those columns to this reward as ``metadata`` (``RewardModel.metadata``).

Checking one image (:func:`judge`, pure and tested on hand-made detections):

* detections of each class above a confidence threshold (``threshold``, 0.3; ``counting_threshold``,
  0.9, for rows tagged ``counting``), best first, at most ``max_objects`` per class;
* every ``include`` entry needs ``count`` objects of its class (the best ``count`` are checked
  further); with ``color``, at least ``count`` of them classified as that color; with
  ``position: [relation, j]``, each of them in that relation (:func:`relations`) to every object
  matched for entry ``j``, which must itself have matched;
* every ``exclude`` entry: fewer than ``count`` objects of its class.

Each of those checks is a clause. The reward is the fraction of clauses an image satisfies
(``strict: false``, the default, a dense signal for RL) or GenEval's 0/1 correctness (``strict:
true``: all clauses hold). 1.0 means correct either way. For the partial score an ``exclude`` of a
class that an ``include`` asks for (GenEval's counting rows: "three cats" excludes a fourth) holds
only when that include's count did, so an empty image earns nothing on a counting row. Evaluation also reports
``correct/{tag}`` per tag and ``overall``, GenEval's score (the mean of the per-tag accuracies).

Models (``from_pretrained``, a local folder or a hub id): an instance-segmentation
``Mask2FormerForUniversalSegmentation`` for detection (``detector``, default COCO Mask2Former
Swin-S, the architecture GenEval uses; its ``id2label`` names the classes, and ``class_aliases``
maps GenEval's names to it; images are resized to ``detector_size`` squared, 800 by default, near
GenEval's 800-pixel short side) and a ``CLIPModel`` for colors (``clip_model``): each matched
object's box is cropped, pixels outside its mask set to gray (#999), and classified zero-shot among
GenEval's ten colors with three prompts per color averaged. Both run in float32 whatever ``dtype``
says (a bf16 detector moves confidences near the 0.9 counting threshold). This follows GenEval's
procedure with transformers models instead of mmdetection, so scores are close to, not identical
with, the official evaluator's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from shared.rewards.base import RewardModel

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's
DETECTOR = "facebook/mask2former-swin-small-coco-instance"
CLIP_MODEL = "openai/clip-vit-large-patch14"
#: GenEval's class names that COCO detectors in transformers spell differently
#: zero-shot color prompts, averaged per color
COLOR_TEMPLATES = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}", "a photo of a {color} object")
GRAY = 0.6  # #999: the background color objects are classified on
DEFAULT_ALIASES = {"computer mouse": "mouse", "computer keyboard": "keyboard", "tv remote": "remote",
                   "motorbike": "motorcycle", "aeroplane": "airplane", "tvmonitor": "tv", "sofa": "couch",
                   "diningtable": "dining table", "pottedplant": "potted plant"}


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` ``(x1, y1, x2, y2)`` in pixels (y down), its confidence, and
    optionally its ``[H, W]`` bool mask (used to gray out the background for color)."""

    box: tuple[float, float, float, float]
    score: float
    mask: torch.Tensor | None = None


def relations(a: Sequence[float], b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Where box ``a`` is relative to box ``b`` (``(x1, y1, x2, y2)``, y down), GenEval's rule.

    The center offset ``a - b`` is shrunk per axis by ``threshold`` times the two boxes' summed
    extent on that axis (toward 0, not past it) and divided by the unshrunk offset's length; a
    component below -0.5 / above 0.5 gives "left of" / "right of" (x) or "above" / "below" (y).
    Boxes whose shrunk offset vanishes (overlapping centers) stand in no relation: ``set()``."""
    ca = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
    cb = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    extent = (abs(a[2] - a[0]) + abs(b[2] - b[0]), abs(a[3] - a[1]) + abs(b[3] - b[1]))
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    shrunk = [math.copysign(max(abs(o) - threshold * e, 0.0), o) for o, e in zip(offset, extent)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


@dataclasses.dataclass
class Verdict:
    """The clauses of one row checked on one image: ``(what was required, whether it holds)``."""

    clauses: list[tuple[str, bool]]

    @property
    def correct(self) -> bool:
        return all(ok for _, ok in self.clauses)

    @property
    def partial(self) -> float:
        return sum(ok for _, ok in self.clauses) / len(self.clauses) if self.clauses else 0.0


def check_metadata(meta: Mapping[str, Any], where: str) -> None:
    """``ValueError`` naming ``where`` and the fix when ``meta`` is not a GenEval row."""
    fix = ('Fix: give the row GenEval\'s columns, e.g. {"tag": "single_object", "include": '
           '[{"class": "bench", "count": 1}]}, or route geneval to the sources that have them '
           '(rewards[].datasets).')
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where} has no GenEval 'include' list (its metadata keys: {sorted(meta) or 'none'}). "
                         f"{fix}")
    for key in ("include", "exclude"):
        for i, req in enumerate(meta.get(key) or []):
            at = f"{where}: {key}[{i}]"
            if not isinstance(req, dict) or not isinstance(req.get("class"), str):
                raise ValueError(f"{at} must be an object with a 'class' name, got {req!r}. {fix}")
            count = req.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{at}: 'count' must be an integer >= 1, got {count!r}. {fix}")
            if key == "exclude":
                continue
            if "color" in req and req["color"] not in COLORS:
                raise ValueError(f"{at}: color {req['color']!r} is not one of GenEval's {', '.join(COLORS)}.")
            pos = req.get("position")
            if pos is not None and not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
                                        and isinstance(pos[1], int) and 0 <= pos[1] < i):
                raise ValueError(f"{at}: 'position' must be [relation, j] with relation one of "
                                 f"{', '.join(RELATIONS)} and j an earlier include entry, got {pos!r}.")


def judge(meta: Mapping[str, Any], found: Mapping[str, Sequence[Detection]],
          color_of: Callable[[str, Detection], str], position_threshold: float = 0.1) -> Verdict:
    """Check one image against its row (module docstring). ``found``: per class its detections
    above the row's threshold, best first; ``color_of(class, detection)``: the detection's color
    (called only for entries with a ``color``). ``meta`` must pass :func:`check_metadata`."""
    clauses: list[tuple[str, bool]] = []
    groups: list[Sequence[Detection] | None] = []
    counted: dict[str, bool] = {}  # class -> did every include of it find its count
    for req in meta["include"]:
        name, count = req["class"], int(req.get("count", 1))
        objects = list(found.get(name, ()))[:count]
        matched = len(objects) >= count
        counted[name] = counted.get(name, True) and matched
        clauses.append((f"{count} {name}", matched))
        if "color" in req:
            ok = matched and sum(color_of(name, o) == req["color"] for o in objects) >= count
            clauses.append((f"{req['color']} {name}", ok))
            matched = matched and ok
        if req.get("position") is not None:
            relation, j = req["position"]
            targets = groups[j]
            ok = matched and targets is not None and all(
                relation in relations(o.box, t.box, position_threshold) for o in objects for t in targets)
            clauses.append((f"{name} {relation} {meta['include'][j]['class']}", ok))
            matched = matched and ok
        groups.append(objects if matched else None)
    for req in meta.get("exclude") or []:
        count = int(req.get("count", 1))
        few = len(found.get(req["class"], ())) < count
        clauses.append((f"fewer than {count} {req['class']}", few and counted.get(req["class"], True)))
    return Verdict(clauses)


def _box(mask: torch.Tensor) -> tuple[float, float, float, float] | None:
    """The ``(x1, y1, x2, y2)`` pixel extent of a ``[H, W]`` bool mask (x2, y2 exclusive), None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1


class GenEval(RewardModel):
    """GenEval as a reward (module docstring). Pointwise; reads row metadata.

    Args:
        detector: Mask2Former instance-segmentation folder or hub id (processor in the same folder).
        clip_model: CLIP folder or hub id for colors (tokenizer and image processor in the same folder).
        threshold / counting_threshold: detection confidence; the latter for rows tagged counting.
        max_objects: detections kept per class.
        position_threshold: :func:`relations`' margin.
        strict: 0/1 correctness instead of the fraction of clauses.
        class_aliases: GenEval class name -> the detector's label, over :data:`DEFAULT_ALIASES`.
        detector_size: the square side (a multiple of 32) images are resized to for detection.
    """

    kind = "pointwise"
    metadata = True

    def __init__(self, *, detector: str = DETECTOR, clip_model: str = CLIP_MODEL, threshold: float = 0.3,
                 counting_threshold: float = 0.9, max_objects: int = 16, position_threshold: float = 0.1,
                 strict: bool = False, class_aliases: dict[str, str] | None = None, detector_size: int = 800,
                 **options) -> None:
        super().__init__(**options)
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from shared.rewards.clip_rewards import CLIPScore, load_pretrained

        if not (0 <= threshold <= 1 and 0 <= counting_threshold <= 1) or max_objects < 1 or position_threshold < 0:
            raise ValueError(f"geneval: need thresholds in [0, 1], max_objects >= 1 and position_threshold >= 0; got "
                             f"threshold={threshold}, counting_threshold={counting_threshold}, "
                             f"max_objects={max_objects}, position_threshold={position_threshold}")
        if detector_size < 32 or detector_size % 32:
            raise ValueError(f"geneval: detector_size must be a positive multiple of 32 (the processor pads other "
                             f"sizes, which shifts the masks), got {detector_size}")
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.position_threshold, self.strict = int(max_objects), float(position_threshold), bool(strict)
        self.aliases = {**DEFAULT_ALIASES, **(class_aliases or {})}
        self.detector_size = int(detector_size)
        f32 = torch.float32  # confidences near the 0.9 counting threshold must not move with the dtype
        self.detector = load_pretrained(Mask2FormerForUniversalSegmentation.from_pretrained, detector,
                                        option="detector", who="geneval").eval().requires_grad_(False)
        self.detector.to(device=self.device, dtype=f32)
        self.processor = load_pretrained(AutoImageProcessor.from_pretrained, detector, option="detector", who="geneval")
        self.labels = {i: str(n) for i, n in self.detector.config.id2label.items()}
        try:  # the clip reward's backbone: its preprocessing, tokenizer and normalized embeddings
            self.clip = CLIPScore(model_name_or_path=clip_model, device=self.device, dtype=f32)
        except OSError as e:  # (FileNotFoundError included) named by the option the user set
            raise type(e)(f"geneval: clip_model (the CLIP that names colors): {e}") from e
        self._color_text: dict[str, torch.Tensor] = {}
        self._seen: dict[bytes, Verdict] = {}  # (image, prompt, row) digest -> its verdict, the newest SEEN_MAX

    @classmethod
    def row_problem(cls, metadata: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> str | None:
        """What keeps a row from being scored: its metadata is not GenEval's, or (when the
        detector's config can be read here) it names a class the detector does not know."""
        try:
            check_metadata(metadata, "the row")
        except ValueError as e:
            return str(e)
        options = options or {}
        labels = detector_labels(str(options.get("detector", DETECTOR)))
        if labels is None:
            return None
        aliases = {**DEFAULT_ALIASES, **(options.get("class_aliases") or {})}
        for req in list(metadata["include"]) + list(metadata.get("exclude") or []):
            if aliases.get(req["class"], req["class"]) not in labels:
                return unknown_class(req["class"], labels)
        return None

    # --- models ------------------------------------------------------------------------------

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[dict[str, list[Detection]]]:
        """Per image ``[3, H, W]`` in [0, 1]: detector label -> its detections above
        ``min(threshold, counting_threshold)``, best first, boxes and masks in the image's pixels."""
        from shared.images import to_uint8_hwc

        size = (self.detector_size, self.detector_size)
        resized = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        pil = [_pil(x) for x in to_uint8_hwc(resized.clamp(0, 1))]
        inputs = self.processor(images=pil, do_resize=False, return_tensors="pt")
        out = self.detector(pixel_values=inputs["pixel_values"].to(self.device, torch.float32))
        sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * images.shape[0]
        results = self.processor.post_process_instance_segmentation(
            out, threshold=min(self.threshold, self.counting_threshold), target_sizes=sizes, return_binary_maps=True)
        return [self._detections(res) for res in results]

    def _detections(self, result: dict) -> dict[str, list[Detection]]:
        """One image's ``post_process_instance_segmentation`` result (``segmentation``: one binary
        map per entry of ``segments_info``) -> label -> detections, best first; empty masks dropped."""
        per: dict[str, list[Detection]] = {}
        for k, info in enumerate(result["segments_info"]):
            mask = result["segmentation"][k].bool().cpu()
            box = _box(mask)
            if box is not None:
                per.setdefault(self.labels[int(info["label_id"])], []).append(Detection(box, float(info["score"]), mask))
        return {k: sorted(v, key=lambda d: -d.score) for k, v in per.items()}

    @torch.no_grad()
    def color(self, image: torch.Tensor, name: str, det: Detection) -> str:
        """The color CLIP gives the object ``det`` of class ``name`` in ``image`` ``[3, H, W]``:
        its box cropped, the pixels outside its mask gray, the closest of :data:`COLORS` (each
        color's embedding the normalized mean of :data:`COLOR_TEMPLATES`)."""
        x1, y1, x2, y2 = (int(v) for v in det.box)
        crop = image[:, y1:y2, x1:x2].float().clone()
        if det.mask is not None:
            keep = det.mask[y1:y2, x1:x2].to(crop.device)
            crop = torch.where(keep, crop, torch.full_like(crop, GRAY))
        if name not in self._color_text:
            texts = [t.format(color=c, name=name) for c in COLORS for t in COLOR_TEMPLATES]
            emb = self.clip.text_embeds(self.clip.tokenize(texts)).view(len(COLORS), len(COLOR_TEMPLATES), -1)
            self._color_text[name] = F.normalize(emb.mean(dim=1), dim=-1)
        emb = self.clip.image_embeds(self.clip.preprocess(crop[None]))
        return COLORS[int((emb @ self._color_text[name].T).argmax())]

    # --- the reward ----------------------------------------------------------------------------

    def verdicts(self, images: torch.Tensor, prompts: list[str], metadata: Sequence[Mapping[str, Any]]) -> list[Verdict]:
        """One :class:`Verdict` per image, each against its row's metadata."""
        if len(metadata) != len(prompts) or len(prompts) != images.shape[0]:
            raise ValueError(f"geneval: {images.shape[0]} images, {len(prompts)} prompts and metadata for "
                             f"{len(metadata)} samples; one of each per sample")
        for i, meta in enumerate(metadata):
            try:
                check_metadata(meta, f"the row of prompt {prompts[i]!r}")
            except ValueError as e:
                raise ValueError(f"geneval: {e}") from None
        pixels = images.detach().float().cpu()
        keys = [_key(pixels[i], prompts[i], meta) for i, meta in enumerate(metadata)]
        todo = [i for i, key in enumerate(keys) if key not in self._seen]
        fresh: dict[bytes, Verdict] = {}
        if todo:  # evaluation asks score() then details() about the same images: judged once
            fresh = dict(zip((keys[i] for i in todo), self._judge(images[todo], [prompts[i] for i in todo],
                                                                   [metadata[i] for i in todo])))
        out = [fresh[key] if key in fresh else self._seen[key] for key in keys]
        self._seen.update(fresh)
        while len(self._seen) > SEEN_MAX:  # the oldest go first
            self._seen.pop(next(iter(self._seen)))
        return out

    def _judge(self, images: torch.Tensor, prompts: list[str], metadata: Sequence[Mapping[str, Any]]) -> list[Verdict]:
        detections = self.detect(images)
        out = []
        for i, (meta, dets) in enumerate(zip(metadata, detections)):
            limit = self.counting_threshold if meta.get("tag") == "counting" else self.threshold
            names = {req["class"] for req in list(meta["include"]) + list(meta.get("exclude") or [])}
            found = {n: [d for d in dets.get(self._label(n, prompts[i]), []) if d.score >= limit][:self.max_objects]
                     for n in names}
            out.append(judge(meta, found, lambda n, d, i=i: self.color(images[i], n, d), self.position_threshold))
        return out

    def _label(self, name: str, prompt: str) -> str:
        label = self.aliases.get(name, name)
        if label not in set(self.labels.values()):
            raise ValueError(f"geneval: prompt {prompt!r}: " + unknown_class(name, frozenset(self.labels.values())))
        return label

    def score(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        verdicts = self.verdicts(images, prompts, metadata or [{}] * len(prompts))
        return torch.tensor([float(v.correct) if self.strict else v.partial for v in verdicts])

    def details(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """``correct`` (0/1 per image) and ``correct/{tag}`` for every GenEval tag (NaN for images of
        other tags; the same keys on every process, so evaluation's per-key reductions line up)."""
        metadata = metadata or [{}] * len(prompts)
        correct = torch.tensor([float(v.correct) for v in self.verdicts(images, prompts, metadata)])
        out = {"correct": correct}
        tags = sorted(set(TAGS) | {str(m["tag"]) for m in metadata if m.get("tag") is not None})
        for tag in tags:
            mine = torch.tensor([m.get("tag") is not None and str(m["tag"]) == tag for m in metadata])
            out[f"correct/{tag}"] = torch.where(mine, correct, torch.full_like(correct, float("nan")))
        return out

    def summarize_details(self, means: dict[str, float]) -> dict[str, float]:
        """GenEval's ``overall``: the unweighted mean of the per-tag accuracies present."""
        tags = [v for k, v in means.items() if k.startswith("correct/")]
        return {"overall": sum(tags) / len(tags)} if tags else {}


def unknown_class(name: str, labels) -> str:
    return (f"class {name!r} is not a label of the detector ({len(labels)} labels, e.g. "
            f"{', '.join(sorted(labels)[:5])}). Fix: map it with class_aliases: {{{name!r}: <detector label>}}.")


@functools.lru_cache(maxsize=8)
def detector_labels(detector: str) -> frozenset[str] | None:
    """The detector's class names from its ``config.json`` alone (local folder or cached hub id),
    None when it cannot be read here (then classes are checked when the reward is built)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(detector, local_files_only=True)
    except (OSError, ValueError):
        return None
    return frozenset(str(n) for n in (getattr(config, "id2label", None) or {}).values()) or None


SEEN_MAX = 4096


def _key(image: torch.Tensor, prompt: str, meta: Mapping[str, Any]) -> bytes:
    """A digest of one sample: its pixels (a float32 CPU ``[3, H, W]``), its prompt and its row."""
    import hashlib
    import json

    h = hashlib.blake2b(digest_size=16)
    h.update(image.contiguous().numpy().tobytes())
    h.update(prompt.encode("utf-8"))
    h.update(json.dumps(meta, sort_keys=True, default=str).encode("utf-8"))
    return h.digest()


def _pil(hwc):
    from PIL import Image

    return Image.fromarray(hwc)
