"""The toy world of a miniature GenEval: prompts, a fixed train/test split, scenes and renders.

Conventions:
    * Images are ``uint8 [H, W, 3]`` RGB, ``IMAGE_SIZE`` (64) pixels square by default, with a plain
      ``BACKGROUND`` and hard-edged (not anti-aliased) shapes filled with exact ``COLORS`` values.
    * Scene coordinates are in pixels of the 64-pixel canvas, continuous: pixel ``(row i, col j)``
      covers ``[j, j+1] x [i, i+1]`` and its centre is ``(j + 0.5, i + 0.5)``; ``y`` grows downward.
      ``render(scene, size)`` scales the scene to any other size.
    * An object's ``size`` is the side of its square bounding box; ``(cx, cy)`` is the box centre.
      A triangle is upright and isosceles (base = height = ``size``, apex at the top).

Prompt grammar (lowercase, GenEval phrasing; ``parse_prompt`` is the exact inverse of ``prompt_text``):

    single_object  "a photo of a circle"
    two_object     "a photo of a circle and a square"              (two different shapes)
    counting       "a photo of one circle" / "a photo of two circles" ... "four" (counts 1-4)
    colors         "a photo of a red circle"
    position       "a photo of a circle left of a square"          (first object REL second object;
                   REL in "left of", "right of", "above", "below"; two different shapes)
    color_attr     "a photo of a red square and a blue circle"    (different shapes and colours)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (150, 50, 190),
    "cyan": (30, 200, 210),
}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("one", "two", "three", "four")  # counts 1..4

SINGLE_SIZE = (14.0, 22.0)  # bounding-box side range of a lone object, in 64-px pixels
MULTI_SIZE = (10.0, 16.0)  # ... of each object of a multi-object scene
GAP = 3.0  # minimum gap between the bounding boxes of two objects
BORDER = 1.0  # minimum distance from a bounding box to the image edge
RELATION_SEPARATION = 12.0  # position scenes: centre distance along the relation's axis


@dataclass(frozen=True)
class ObjectSpec:
    """One object named by a prompt: its shape and (colors / color_attr only) its colour."""

    shape: str
    color: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt. ``count`` is set for counting, ``relation`` for position."""

    category: str
    objects: tuple[ObjectSpec, ...]
    count: int | None = None
    relation: str | None = None


@dataclass
class Obj:
    """A drawn object: centre ``(cx, cy)`` and bounding-box side ``size`` in 64-px pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass
class Scene:
    objects: list[Obj]


# --------------------------------------------------------------------------- grammar

def _plural(shape: str) -> str:
    return shape + "s"


def prompt_text(spec: PromptSpec) -> str:
    """The prompt sentence of ``spec`` (see the module docstring for the grammar)."""
    _validate(spec)
    o = spec.objects
    if spec.category == "single_object":
        body = f"a {o[0].shape}"
    elif spec.category == "two_object":
        body = f"a {o[0].shape} and a {o[1].shape}"
    elif spec.category == "counting":
        n = spec.count
        body = f"{NUMBERS[n - 1]} {o[0].shape if n == 1 else _plural(o[0].shape)}"
    elif spec.category == "colors":
        body = f"a {o[0].color} {o[0].shape}"
    elif spec.category == "position":
        body = f"a {o[0].shape} {spec.relation} a {o[1].shape}"
    else:  # color_attr
        body = f"a {o[0].color} {o[0].shape} and a {o[1].color} {o[1].shape}"
    return "a photo of " + body


def _validate(spec: PromptSpec) -> None:
    """Raise ``ValueError`` if ``spec`` is not a well-formed toy-world prompt."""
    def bad(why: str) -> ValueError:
        return ValueError(f"invalid toy-world PromptSpec {spec!r}: {why}")

    n_objects = {"single_object": 1, "two_object": 2, "counting": 1, "colors": 1, "position": 2, "color_attr": 2}
    if spec.category not in n_objects:
        raise bad(f"category must be one of {', '.join(CATEGORIES)}")
    if len(spec.objects) != n_objects[spec.category]:
        raise bad(f"{spec.category} needs {n_objects[spec.category]} object(s)")
    colored = spec.category in ("colors", "color_attr")
    for o in spec.objects:
        if o.shape not in SHAPES:
            raise bad(f"shape must be one of {', '.join(SHAPES)}")
        if colored != (o.color is not None) or (colored and o.color not in COLORS):
            raise bad(f"{spec.category} objects need {'a colour from ' + ', '.join(COLORS) if colored else 'no colour'}")
    if len(spec.objects) == 2 and spec.objects[0].shape == spec.objects[1].shape:
        raise bad("the two objects must have different shapes")
    if spec.category == "color_attr" and spec.objects[0].color == spec.objects[1].color:
        raise bad("the two objects must have different colours")
    if (spec.count is not None) != (spec.category == "counting") or (spec.count is not None and not 1 <= spec.count <= 4):
        raise bad("count must be 1..4 for counting and None otherwise")
    if (spec.relation is not None) != (spec.category == "position") or (
        spec.relation is not None and spec.relation not in RELATIONS
    ):
        raise bad(f"relation must be one of {', '.join(RELATIONS)} for position and None otherwise")


_S = "(" + "|".join(SHAPES) + ")"
_C = "(" + "|".join(COLORS) + ")"
_PATTERNS = {
    "single_object": re.compile(rf"a photo of a {_S}"),
    "two_object": re.compile(rf"a photo of a {_S} and a {_S}"),
    "counting": re.compile(rf"a photo of ({'|'.join(NUMBERS)}) {_S}(s?)"),
    "colors": re.compile(rf"a photo of a {_C} {_S}"),
    "position": re.compile(rf"a photo of a {_S} ({'|'.join(RELATIONS)}) a {_S}"),
    "color_attr": re.compile(rf"a photo of a {_C} {_S} and a {_C} {_S}"),
}
ACCEPTED_PATTERNS = (
    "'a photo of a SHAPE'",
    "'a photo of a SHAPE and a SHAPE2'",
    "'a photo of one SHAPE' / 'a photo of two|three|four SHAPEs'",
    "'a photo of a COLOR SHAPE'",
    "'a photo of a SHAPE left of|right of|above|below a SHAPE2'",
    "'a photo of a COLOR SHAPE and a COLOR2 SHAPE2'",
)


def parse_prompt(text: str) -> PromptSpec:
    """Inverse of :func:`prompt_text`; ignores surrounding whitespace, repeated spaces and case.

    Raises ``ValueError`` quoting ``text`` and listing the accepted patterns if it is not a
    toy-world prompt (SHAPE in circle/square/triangle, COLOR in the palette, SHAPE2 != SHAPE,
    COLOR2 != COLOR).
    """
    norm = " ".join(str(text).lower().split())
    spec = None
    for category, pattern in _PATTERNS.items():
        m = pattern.fullmatch(norm)
        if not m:
            continue
        g = m.groups()
        if category in ("single_object", "two_object"):
            spec = PromptSpec(category, tuple(ObjectSpec(s) for s in g))
        elif category == "counting":
            n = NUMBERS.index(g[0]) + 1
            if (n == 1) == (g[2] == "s"):  # "one circle" but "two circles"
                break
            spec = PromptSpec(category, (ObjectSpec(g[1]),), count=n)
        elif category == "colors":
            spec = PromptSpec(category, (ObjectSpec(g[1], g[0]),))
        elif category == "position":
            spec = PromptSpec(category, (ObjectSpec(g[0]), ObjectSpec(g[2])), relation=g[1])
        else:
            spec = PromptSpec(category, (ObjectSpec(g[1], g[0]), ObjectSpec(g[3], g[2])))
        break
    try:
        if spec is None:
            raise ValueError("no pattern matches")
        _validate(spec)
    except ValueError as e:
        raise ValueError(
            f"not a toy-world prompt: {text!r} ({e}). Accepted patterns: {'; '.join(ACCEPTED_PATTERNS)} "
            f"with SHAPE in {{{', '.join(SHAPES)}}}, COLOR in {{{', '.join(COLORS)}}}, "
            f"SHAPE2 != SHAPE and COLOR2 != COLOR."
        ) from None
    return spec


# --------------------------------------------------------------------------- prompts and split

def all_prompts() -> list[PromptSpec]:
    """Every prompt, grouped by category in ``CATEGORIES`` order.

    single_object 3, two_object 6 (ordered shape pairs), counting 12, colors 18, position 24
    (6 ordered shape pairs x 4 relations), color_attr 180 (6 ordered shape pairs x 30 ordered
    colour pairs): 243 in all.
    """
    out = [PromptSpec("single_object", (ObjectSpec(s),)) for s in SHAPES]
    out += [PromptSpec("two_object", (ObjectSpec(a), ObjectSpec(b))) for a, b in permutations(SHAPES, 2)]
    out += [PromptSpec("counting", (ObjectSpec(s),), count=n) for n in range(1, 5) for s in SHAPES]
    out += [PromptSpec("colors", (ObjectSpec(s, c),)) for c in COLORS for s in SHAPES]
    out += [
        PromptSpec("position", (ObjectSpec(a), ObjectSpec(b)), relation=r)
        for a, b in permutations(SHAPES, 2)
        for r in RELATIONS
    ]
    out += [
        PromptSpec("color_attr", (ObjectSpec(a, ca), ObjectSpec(b, cb)))
        for a, b in permutations(SHAPES, 2)
        for ca, cb in permutations(COLORS, 2)
    ]
    return out


# Held-out combinations (fixed, no randomness).
# colors: colour i of the palette with shape i mod 3 -> each colour once, each shape twice.
HELDOUT_COLOR_SHAPE = frozenset((c, SHAPES[i % 3]) for i, c in enumerate(COLORS))
# counting: each count once.
HELDOUT_COUNT_SHAPE = frozenset({(1, "triangle"), (2, "circle"), (3, "square"), (4, "triangle")})
# two_object: the unordered pair {circle, square}, i.e. both of its orders.
HELDOUT_TWO_OBJECT = frozenset({("circle", "square"), ("square", "circle")})
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# position: 4 spatial arrangements, each also held out in its mirrored wording
# ("a circle left of a square" == "a square right of a circle"): each relation twice.
_HELDOUT_ARRANGEMENTS = (
    ("circle", "left of", "square"),
    ("square", "left of", "triangle"),
    ("triangle", "above", "circle"),
    ("circle", "above", "square"),
)
HELDOUT_POSITION = frozenset(
    t for a, r, b in _HELDOUT_ARRANGEMENTS for t in ((a, r, b), (b, _INVERSE[r], a))
)


def _held_out(spec: PromptSpec) -> bool:
    o = spec.objects
    if spec.category == "two_object":
        return (o[0].shape, o[1].shape) in HELDOUT_TWO_OBJECT
    if spec.category == "counting":
        return (spec.count, o[0].shape) in HELDOUT_COUNT_SHAPE
    if spec.category in ("colors", "color_attr"):
        return any((x.color, x.shape) in HELDOUT_COLOR_SHAPE for x in o)
    if spec.category == "position":
        return (o[0].shape, spec.relation, o[1].shape) in HELDOUT_POSITION
    return False


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[PromptSpec, ...], tuple[PromptSpec, ...]]:
    train, test = [], []
    for spec in all_prompts():
        if spec.category == "single_object":
            train.append(spec)
            test.append(spec)
        elif not _held_out(spec):
            train.append(spec)
        elif spec.category != "color_attr" or all((x.color, x.shape) in HELDOUT_COLOR_SHAPE for x in spec.objects):
            test.append(spec)
        # else: color_attr with one unseen binding: in neither split
    return tuple(train), tuple(test)


def split() -> tuple[list[PromptSpec], list[PromptSpec]]:
    """The fixed (train, test) prompt split; deterministic, no randomness.

    Test prompts' combinations never appear in training prompts:

    * colors: 6 held-out (colour, shape) bindings, one per colour, two per shape
      (``HELDOUT_COLOR_SHAPE``); every colour and shape still appears in training.
    * counting: 4 held-out (count, shape) pairs, one per count (``HELDOUT_COUNT_SHAPE``).
    * position: 8 held-out (shape, relation, shape) triples, each relation twice; they are 4
      arrangements, each with its mirrored wording, so no test arrangement is seen in training
      under another phrasing (``HELDOUT_POSITION``).
    * two_object: the 2 orders of the pair {circle, square} (``HELDOUT_TWO_OBJECT``).
    * color_attr: training drops every prompt with a held-out binding in either slot; the test
      split keeps the 24 prompts whose *both* bindings are held out (the 72 with exactly one
      held-out binding are in neither split).
    * single_object has nothing to hold out: its 3 prompts are in both splits.

    Sizes: train 127 (3 / 4 / 8 / 12 / 16 / 84), test 47 (3 / 2 / 4 / 6 / 8 / 24) in
    ``CATEGORIES`` order.

    Note: scenes for prompts that do not name colours get random colours, so a held-out
    binding such as a red circle can still be *drawn* in training images; it is never *named*.
    """
    train, test = _split()
    return list(train), list(test)


# --------------------------------------------------------------------------- scenes

def _objects_to_draw(spec: PromptSpec, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(shape, colour) of each object of a scene for ``spec``, random colours where unnamed."""
    names = list(COLORS)

    def color(o: ObjectSpec) -> str:
        return o.color if o.color is not None else names[int(rng.integers(len(names)))]

    if spec.category == "counting":
        return [(spec.objects[0].shape, color(spec.objects[0])) for _ in range(spec.count)]
    return [(o.shape, color(o)) for o in spec.objects]


def _separated(a: Obj, b: Obj) -> bool:
    need = (a.size + b.size) / 2 + GAP
    return abs(a.cx - b.cx) >= need or abs(a.cy - b.cy) >= need


def relation_holds(first: Obj | tuple[float, float], second: Obj | tuple[float, float], relation: str, margin: float) -> bool:
    """Whether ``first`` is ``relation`` ``second`` by more than ``margin`` (y grows downward).

    Accepts objects or ``(cx, cy)`` pairs.
    """
    (x1, y1), (x2, y2) = ((p.cx, p.cy) if isinstance(p, Obj) else p for p in (first, second))
    return {
        "left of": x1 + margin < x2,
        "right of": x1 > x2 + margin,
        "above": y1 + margin < y2,
        "below": y1 > y2 + margin,
    }[relation]


def sample_scene(spec: PromptSpec | str, rng: np.random.Generator, *, max_tries: int = 200) -> Scene:
    """A random scene satisfying ``spec`` (objects inside the image, bounding boxes >= ``GAP``
    apart, lone objects ``SINGLE_SIZE``, others ``MULTI_SIZE``; position: relation holds with
    centres >= ``RELATION_SEPARATION`` apart on its axis). No distractors.

    Objects are placed one at a time by rejection sampling (``max_tries`` per object); a stuck
    scene restarts, at most ``max_tries`` times, then ``RuntimeError``.
    """
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    _validate(spec)
    draw = _objects_to_draw(spec, rng)
    lo, hi = SINGLE_SIZE if len(draw) == 1 else MULTI_SIZE
    for _ in range(max_tries):
        placed: list[Obj] = []
        for shape, color in draw:
            for _ in range(max_tries):
                size = float(rng.uniform(lo, hi))
                half = size / 2 + BORDER
                cx, cy = (float(v) for v in rng.uniform(half, IMAGE_SIZE - half, size=2))
                obj = Obj(shape, color, cx, cy, size)
                if not all(_separated(obj, p) for p in placed):
                    continue
                if spec.category == "position" and placed and not relation_holds(
                    placed[0], obj, spec.relation, RELATION_SEPARATION - 1e-9
                ):
                    continue
                placed.append(obj)
                break
            else:
                break  # this object found no room: restart the scene
        if len(placed) == len(draw):
            return Scene(placed)
    raise RuntimeError(f"sample_scene: could not place the objects of {prompt_text(spec)!r} in {max_tries} tries")


def shape_mask(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixel centres ``(xs, ys)`` (scene units) inside ``obj``."""
    h = obj.size / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":
        t = (dy + h) / obj.size  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """``uint8 [size, size, 3]``: hard-edged shapes in exact palette colours on ``BACKGROUND``.

    The scene (64-px units) is scaled by ``size / IMAGE_SIZE``.
    """
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    centres = (np.arange(size) + 0.5) * (IMAGE_SIZE / size)
    xs, ys = centres[None, :], centres[:, None]
    for obj in scene.objects:
        image[shape_mask(obj, xs, ys)] = COLORS[obj.color]
    return image


def sample_pair(spec: PromptSpec | str, seed: int) -> tuple[str, np.ndarray]:
    """``(prompt, uint8 [64, 64, 3] image)`` for ``spec``, deterministic from ``seed``."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    return prompt_text(spec), render(sample_scene(spec, np.random.default_rng(seed)))


def miscaptioned(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """A scene spec that ``spec``'s caption describes WRONGLY in its category's one respect, as
    web captions get compositions wrong: single_object / two_object: one shape replaced (by
    a shape the prompt does not name); counting: the count one off (within 1-4); colors: another
    colour; position: the relation reversed; color_attr: the two colours swapped. A render of it
    never verifies against ``prompt_text(spec)``."""
    o = spec.objects
    if spec.category in ("single_object", "two_object"):
        k = int(rng.integers(len(o)))
        others = [s for s in SHAPES if s not in {x.shape for x in o}]
        new = ObjectSpec(others[int(rng.integers(len(others)))], o[k].color)
        return PromptSpec(spec.category, o[:k] + (new,) + o[k + 1:])
    if spec.category == "counting":
        counts = [c for c in (spec.count - 1, spec.count + 1) if 1 <= c <= 4]
        return PromptSpec("counting", o, count=counts[int(rng.integers(len(counts)))])
    if spec.category == "colors":
        colors = [c for c in COLORS if c != o[0].color]
        return PromptSpec("colors", (ObjectSpec(o[0].shape, colors[int(rng.integers(len(colors)))]),))
    if spec.category == "position":
        return PromptSpec("position", o, relation=_INVERSE[spec.relation])
    return PromptSpec("color_attr", (ObjectSpec(o[0].shape, o[1].color), ObjectSpec(o[1].shape, o[0].color)))


def training_pairs(n: int | None, seed: int, caption_noise: float = 0.0) -> Iterator[tuple[str, np.ndarray]]:
    """``n`` (``None``: endless) ``(prompt, uint8 [64, 64, 3] image)`` pretraining pairs.

    Each pair draws a category uniformly, then a train-split prompt of it uniformly, then a
    random scene; the whole stream is deterministic from ``seed``. With ``caption_noise`` ``p``
    > 0, a fraction ``p`` of the images show a :func:`miscaptioned` scene instead (the prompt is
    unchanged): a model pretrained on them puts that much mass on wrong compositions, the error
    RL from a verifier removes. ``caption_noise=0`` draws exactly the stream it always did.
    """
    if not 0.0 <= caption_noise < 1.0:
        raise ValueError(f"caption_noise must be in [0, 1), got {caption_noise}")
    train, _ = split()
    by_category = {c: [s for s in train if s.category == c] for c in CATEGORIES}
    rng = np.random.default_rng(seed)
    noise = np.random.default_rng([seed, 1])  # its own stream: p = 0 leaves the scenes as they were
    i = 0
    while n is None or i < n:
        prompts = by_category[CATEGORIES[int(rng.integers(len(CATEGORIES)))]]
        spec = prompts[int(rng.integers(len(prompts)))]
        drawn = miscaptioned(spec, noise) if caption_noise and noise.random() < caption_noise else spec
        yield prompt_text(spec), render(sample_scene(drawn, rng))
        i += 1


def balanced(specs: list[PromptSpec]) -> list[PromptSpec]:
    """``specs`` with each category's prompts repeated (in order, cycling) up to the size of the
    largest category, categories in ``CATEGORIES`` order: every category is drawn equally often
    by a trainer that samples prompts uniformly (the train split is 2/3 color_attr)."""
    by_category = {c: [s for s in specs if s.category == c] for c in CATEGORIES}
    size = max(len(v) for v in by_category.values())
    return [v[i % len(v)] for v in by_category.values() if v for i in range(size)]


def write_dataset(directory: str | Path, *, balance: bool = False) -> None:
    """Write ``train.jsonl`` and ``test.jsonl`` to ``directory`` (created if needed): each split's
    prompts once, one ``{"prompt": ..., "metadata": {"category": ...}}`` object per line.
    ``balance=True`` writes the train prompts category-balanced (:func:`balanced`, 6 x 84
    lines); the test split is unchanged."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, test = split()
    for name, specs in (("train", balanced(train) if balance else train), ("test", test)):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for spec in specs:
                f.write(json.dumps({"prompt": prompt_text(spec), "metadata": {"category": spec.category}}) + "\n")


def write_pretraining_set(directory: str | Path, n: int, seed: int = 1) -> None:
    """Write ``n`` :func:`training_pairs` (train-split prompts only) to ``directory`` as a
    ``train.ptx_dataset`` folder: ``images/00000.png ...`` and ``train.jsonl`` rows
    ``{"prompt": ..., "image": "00000.png", "metadata": {"category": ...}}``."""
    from PIL import Image

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with open(directory / "train.jsonl", "w", encoding="utf-8") as f:
        for i, (prompt, image) in enumerate(training_pairs(n, seed)):
            name = f"{i:05d}.png"
            Image.fromarray(image).save(directory / "images" / name)
            f.write(json.dumps({"prompt": prompt, "image": name,
                                "metadata": {"category": parse_prompt(prompt).category}}) + "\n")
