"""Write a GenEval-format prompt set: ``train.jsonl`` and ``test.jsonl`` rows of
``{"tag", "include", "exclude"?, "prompt"}`` in GenEval's six tasks, over the 80 COCO classes
(their classes spelled as the COCO detectors in transformers label them, so ``geneval`` needs no
aliases; prompts say "computer mouse", "tv remote", "computer keyboard") and
GenEval's ten colors, from GenEval's prompt templates ("a photo of ..."). Deterministic from
``--seed``.

The split holds out combinations, so the test rows ask for what training never showed: a class
alone, a (count, class), (color, class), class pair, (class, relation, class) or (color, class,
color, class) that a test row uses appears in no train row of its task (about one in five is
held out). Usage::

    python scripts/make_geneval_prompts.py --out data/geneval --train 5000 --test 500

GenEval's own 553 evaluation prompts (``evaluation_metadata.jsonl`` in its repository) are the
benchmark; this set is for training on the same kind of prompt without downloading one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
        "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
        "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
        "hair drier", "toothbrush"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ["left of", "right of", "above", "below"]
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
NUMBERS = {2: "two", 3: "three", 4: "four"}
IRREGULAR = {"person": "people", "sheep": "sheep", "skis": "pairs of skis", "mouse": "computer mice",
             "knife": "knives", "scissors": "pairs of scissors", "hair drier": "hair driers", "tv": "tvs",
             "wine glass": "wine glasses", "bus": "buses", "couch": "couches", "sandwich": "sandwiches",
             "toothbrush": "toothbrushes", "bench": "benches", "cell phone": "cell phones"}


#: how a prompt names a class where the COCO label alone is ambiguous
SAID = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


def said(name: str) -> str:
    return SAID.get(name, name)


def plural(name: str) -> str:
    """The plural of class ``name`` as a prompt says it."""
    if name in IRREGULAR:
        return IRREGULAR[name]
    word = said(name)
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


def a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def held_out(*parts) -> bool:
    """A combination's side, fixed by its hash: about one in five is held out for testing."""
    return hashlib.sha256(json.dumps(parts).encode()).digest()[0] % 5 == 0


def row(tag: str, rng: random.Random) -> dict:
    """One random row of ``tag``."""
    x, y = rng.sample(COCO, 2)
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": x, "count": 1}], "prompt": f"a photo of {a(said(x))}"}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": x, "count": 1}, {"class": y, "count": 1}],
                "prompt": f"a photo of {a(said(x))} and {a(said(y))}"}
    if tag == "counting":
        n = rng.choice(sorted(NUMBERS))
        return {"tag": tag, "include": [{"class": x, "count": n}], "exclude": [{"class": x, "count": n + 1}],
                "prompt": f"a photo of {NUMBERS[n]} {plural(x)}"}
    if tag == "colors":
        c = rng.choice(COLORS)
        return {"tag": tag, "include": [{"class": x, "count": 1, "color": c}], "prompt": f"a photo of {a(c)} {said(x)}"}
    if tag == "position":
        rel = rng.choice(RELATIONS)
        return {"tag": tag, "include": [{"class": y, "count": 1}, {"class": x, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {a(said(x))} {rel} {a(said(y))}"}
    c1, c2 = rng.sample(COLORS, 2)
    return {"tag": tag, "include": [{"class": x, "count": 1, "color": c1}, {"class": y, "count": 1, "color": c2}],
            "prompt": f"a photo of {a(c1)} {said(x)} and {a(c2)} {said(y)}"}


def combination(r: dict) -> tuple:
    """What decides a row's split: its tag and what it combines (a pair of classes unordered)."""
    inc = r["include"]
    if r["tag"] == "two_object":
        return (r["tag"], *sorted(i["class"] for i in inc))
    if r["tag"] == "counting":
        return (r["tag"], inc[0]["count"], inc[0]["class"])
    if r["tag"] == "position":
        return (r["tag"], inc[1]["class"], inc[1]["position"][0], inc[0]["class"])
    return (r["tag"], *[v for i in inc for v in (i.get("color"), i["class"]) if v is not None])


def make(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``n_train`` / ``n_test`` rows, the six tags in turn; test rows use held-out combinations
    only, train rows none. Prompts repeat when a task has fewer combinations than rows asked for
    (single objects: 80 classes)."""
    rng = random.Random(seed)
    out = []
    for side, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            while True:  # about one combination in five is held out, so this ends quickly
                r = row(TAGS[i % len(TAGS)], rng)
                if held_out(*combination(r)) == (side == "test"):
                    break
            rows.append(r)
        out.append(rows)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write train.jsonl and test.jsonl into")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = make(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out}")


if __name__ == "__main__":
    main()
