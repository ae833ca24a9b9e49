"""Toy world: palette, prompt grammar, fixed split, scene sampling, rendering, dataset files."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from shared.toy import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    Obj,
    ObjectSpec,
    PromptSpec,
    Scene,
    all_prompts,
    parse_prompt,
    prompt_text,
    render,
    sample_pair,
    sample_scene,
    split,
    training_pairs,
    write_dataset,
)
from shared.toy.scenes import GAP, RELATION_SEPARATION


def by_category(specs):
    out = {c: [] for c in CATEGORIES}
    for s in specs:
        out[s.category].append(s)
    return out


def test_palette_is_well_separated():
    assert len(COLORS) == 6 and set(COLORS) == {"red", "green", "blue", "yellow", "purple", "cyan"}
    refs = dict(COLORS, background=BACKGROUND)
    for (a, ca), (b, cb) in itertools.combinations(refs.items(), 2):
        distance = float(np.linalg.norm(np.subtract(ca, cb)))
        assert distance >= 95, f"{a} vs {b}: RGB distance {distance:.0f} < 95"


def test_all_prompts_counts_and_round_trip():
    specs = all_prompts()
    counts = Counter(s.category for s in specs)
    assert counts == {"single_object": 3, "two_object": 6, "counting": 12, "colors": 18, "position": 24, "color_attr": 180}
    texts = [prompt_text(s) for s in specs]
    assert len(set(texts)) == len(texts)
    for spec, text in zip(specs, texts):
        assert text == text.lower().strip()
        assert parse_prompt(text) == spec
        assert parse_prompt(f"  {text.upper()}\n") == spec


@pytest.mark.parametrize(
    "spec, text",
    [
        (PromptSpec("single_object", (ObjectSpec("circle"),)), "a photo of a circle"),
        (PromptSpec("two_object", (ObjectSpec("circle"), ObjectSpec("square"))), "a photo of a circle and a square"),
        (PromptSpec("counting", (ObjectSpec("circle"),), count=1), "a photo of one circle"),
        (PromptSpec("counting", (ObjectSpec("triangle"),), count=3), "a photo of three triangles"),
        (PromptSpec("colors", (ObjectSpec("circle", "red"),)), "a photo of a red circle"),
        (
            PromptSpec("position", (ObjectSpec("circle"), ObjectSpec("square")), relation="left of"),
            "a photo of a circle left of a square",
        ),
        (
            PromptSpec("color_attr", (ObjectSpec("square", "red"), ObjectSpec("circle", "blue"))),
            "a photo of a red square and a blue circle",
        ),
    ],
)
def test_grammar_examples(spec, text):
    assert prompt_text(spec) == text
    assert parse_prompt(text) == spec


@pytest.mark.parametrize(
    "bad",
    [
        "a photo of a dog",
        "a photo of a circle and a circle",  # same shape twice
        "a photo of two circle",  # singular after two
        "a photo of one circles",
        "a photo of five circles",
        "a photo of a red square and a red circle",  # same colour twice
        "a photo of a circle next to a square",
        "a photo of a orange circle",
        "",
    ],
)
def test_parse_errors_are_clear(bad):
    with pytest.raises(ValueError) as info:
        parse_prompt(bad)
    message = str(info.value)
    assert repr(bad) in message and "Accepted patterns" in message and "a photo of a SHAPE" in message


def test_prompt_text_rejects_invalid_specs():
    with pytest.raises(ValueError, match="different shapes"):
        prompt_text(PromptSpec("two_object", (ObjectSpec("circle"), ObjectSpec("circle"))))
    with pytest.raises(ValueError, match="count"):
        prompt_text(PromptSpec("counting", (ObjectSpec("circle"),), count=5))


def test_split_sizes_and_single_object_in_both():
    train, test = split()
    assert split() == (train, test)  # fixed
    test_sizes = {c: len(v) for c, v in by_category(test).items()}
    assert test_sizes == {"single_object": 3, "two_object": 2, "counting": 4, "colors": 6, "position": 8, "color_attr": 24}
    assert 40 <= len(test) <= 70
    assert all(len(v) > 0 for v in by_category(train).values())
    assert set(by_category(train)["single_object"]) == set(by_category(test)["single_object"])
    assert not (set(train) - {s for s in train if s.category == "single_object"}) & set(test)


def test_split_holds_out_combinations():
    train, test = split()
    tr, te = by_category(train), by_category(test)

    # colors (and color_attr): (colour, shape) bindings of test prompts never named in training.
    held = {(o.color, o.shape) for s in te["colors"] for o in s.objects}
    assert len(held) == 6
    assert sorted(c for c, _ in held) == sorted(COLORS)  # each colour exactly once
    assert Counter(s for _, s in held) == {s: 2 for s in SHAPES}
    seen = {(o.color, o.shape) for s in tr["colors"] + tr["color_attr"] for o in s.objects}
    assert not held & seen
    assert {c for c, _ in seen} == set(COLORS) and {s for _, s in seen} == set(SHAPES)
    for s in te["color_attr"]:
        assert {(o.color, o.shape) for o in s.objects} <= held  # both bindings unseen
    # counting: one held-out pair per count.
    count_test = {(s.count, s.objects[0].shape) for s in te["counting"]}
    assert sorted(n for n, _ in count_test) == [1, 2, 3, 4]
    assert not count_test & {(s.count, s.objects[0].shape) for s in tr["counting"]}
    # position: literal triples and their mirrored wording are both unseen; each relation twice.
    mirror = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    triples = {(s.objects[0].shape, s.relation, s.objects[1].shape) for s in te["position"]}
    assert Counter(r for _, r, _ in triples) == {"left of": 2, "right of": 2, "above": 2, "below": 2}
    seen_triples = {(s.objects[0].shape, s.relation, s.objects[1].shape) for s in tr["position"]}
    assert not triples & seen_triples
    assert not {(b, mirror[r], a) for a, r, b in triples} & seen_triples
    # two_object: ordered pairs (and their reverses) unseen.
    pairs = {(s.objects[0].shape, s.objects[1].shape) for s in te["two_object"]}
    seen_pairs = {(s.objects[0].shape, s.objects[1].shape) for s in tr["two_object"]}
    assert len(pairs) == 2 and not pairs & seen_pairs and not {(b, a) for a, b in pairs} & seen_pairs


def check_scene(spec, scene):
    objs = scene.objects
    n = {"counting": spec.count}.get(spec.category, len(spec.objects))
    assert len(objs) == n
    lo, hi = (14, 22) if n == 1 else (10, 16)
    for o in objs:
        assert lo <= o.size <= hi and o.color in COLORS
        assert o.size / 2 <= o.cx <= IMAGE_SIZE - o.size / 2 and o.size / 2 <= o.cy <= IMAGE_SIZE - o.size / 2
    for a, b in itertools.combinations(objs, 2):
        need = (a.size + b.size) / 2 + GAP
        assert abs(a.cx - b.cx) >= need or abs(a.cy - b.cy) >= need
    if spec.category == "counting":
        assert {o.shape for o in objs} == {spec.objects[0].shape}
    else:
        assert [o.shape for o in objs] == [s.shape for s in spec.objects]
        for o, s in zip(objs, spec.objects):
            assert s.color is None or o.color == s.color
    if spec.category == "position":
        a, b = objs
        delta = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[spec.relation]
        assert delta >= RELATION_SEPARATION - 1e-6


def test_sampled_scenes_satisfy_their_prompts():
    rng = np.random.default_rng(0)
    for spec in all_prompts():
        for _ in range(3):
            check_scene(spec, sample_scene(spec, rng))
    for n in (1, 2, 3, 4):  # crowded scenes
        spec = PromptSpec("counting", (ObjectSpec("square"),), count=n)
        for _ in range(50):
            check_scene(spec, sample_scene(spec, rng))


def test_render_is_hard_edged_palette_on_background():
    palette = {tuple(c) for c in COLORS.values()} | {BACKGROUND}
    for seed, spec in enumerate(all_prompts()[::7]):
        _, image = sample_pair(spec, seed)
        assert image.dtype == np.uint8 and image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert {tuple(p) for p in image.reshape(-1, 3)} <= palette
        assert tuple(image[0, 0]) == BACKGROUND
    scene = Scene([Obj("square", "red", 32.0, 32.0, 16.0)])
    small, big = render(scene), render(scene, size=128)
    assert big.shape == (128, 128, 3)
    assert (small == COLORS["red"]).all(-1).sum() == 256 and (big == COLORS["red"]).all(-1).sum() == 1024
    triangle = render(Scene([Obj("triangle", "blue", 32.0, 32.0, 20.0)]))
    rows = (triangle == COLORS["blue"]).all(-1).sum(1)
    filled = rows[rows > 0]
    assert filled[0] < filled[-1]  # apex at the top


def test_sampling_is_deterministic():
    spec = parse_prompt("a photo of three circles")
    p1, a = sample_pair(spec, 5)
    p2, b = sample_pair("a photo of three circles", 5)
    _, c = sample_pair(spec, 6)
    assert p1 == p2 == "a photo of three circles"
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    first = list(training_pairs(20, seed=3))
    again = list(training_pairs(20, seed=3))
    other = list(training_pairs(20, seed=4))
    assert [p for p, _ in first] == [p for p, _ in again]
    assert all(x.tobytes() == y.tobytes() for (_, x), (_, y) in zip(first, again))
    assert [p for p, _ in first] != [p for p, _ in other]


def test_training_pairs_use_train_prompts_over_all_categories():
    train, _ = split()
    train_texts = {prompt_text(s) for s in train}
    prompts = [p for p, _ in training_pairs(300, seed=0)]
    assert set(prompts) <= train_texts
    counts = Counter(parse_prompt(p).category for p in prompts)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 30


def test_write_dataset_balanced(tmp_path):
    write_dataset(tmp_path / "toy", balance=True)
    train, test = split()
    rows = [json.loads(line) for line in (tmp_path / "toy" / "train.jsonl").read_text().splitlines()]
    counts = Counter(r["metadata"]["category"] for r in rows)
    assert counts == {c: 84 for c in CATEGORIES}
    assert {r["prompt"] for r in rows} == {prompt_text(s) for s in train}  # every train prompt, nothing else
    assert (tmp_path / "toy" / "test.jsonl").read_text().splitlines() == [
        json.dumps({"prompt": prompt_text(s), "metadata": {"category": s.category}}) for s in test]


def test_write_dataset(tmp_path):
    write_dataset(tmp_path / "toy")
    train, test = split()
    for name, specs in (("train", train), ("test", test)):
        rows = [json.loads(line) for line in (tmp_path / "toy" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [prompt_text(s) for s in specs]
        for row in rows:
            assert set(row) == {"prompt", "metadata"}
            assert row["metadata"] == {"category": parse_prompt(row["prompt"]).category}


def test_miscaptioned_scenes_are_valid_and_never_verify_against_the_caption():
    from shared.toy.scenes import miscaptioned
    from shared.toy.verify import verify

    rng = np.random.default_rng(0)
    train, _ = split()
    seen = Counter()
    for spec in train[::2]:
        wrong = miscaptioned(spec, rng)
        prompt_text(wrong)  # valid
        assert wrong.category == spec.category and wrong != spec
        image = render(sample_scene(wrong, rng))
        verdict = verify(image, prompt_text(spec))
        assert not verdict.correct and verdict.score < 1.0, (prompt_text(spec), wrong)
        seen[spec.category] += 1
    assert set(seen) == set(CATEGORIES)


def test_caption_noise_draws_that_fraction_of_miscaptioned_images():
    from shared.toy.verify import verify

    clean = list(training_pairs(40, seed=3))
    assert [p for p, _ in clean] == [p for p, _ in training_pairs(40, seed=3, caption_noise=0.0)]
    noisy = list(training_pairs(400, seed=3, caption_noise=0.4))
    wrong = sum(not verify(image, prompt).correct for prompt, image in noisy)
    assert 0.3 < wrong / 400 < 0.5  # 0.4 +- 4 binomial s.e.
    assert all(verify(image, prompt).correct for prompt, image in clean)
    with pytest.raises(ValueError, match="caption_noise"):
        next(training_pairs(1, seed=0, caption_noise=1.0))


def test_shipped_balanced_dataset_is_what_write_dataset_writes(tmp_path):
    """examples/data/toy-balanced (the 10-minute recipe's data) is write_dataset(balance=True)'s output."""
    from pathlib import Path

    shipped = Path(__file__).parents[2] / "examples" / "data" / "toy-balanced"
    write_dataset(tmp_path / "toy", balance=True)
    for name in ("train.jsonl", "test.jsonl"):
        assert (shipped / name).read_text() == (tmp_path / "toy" / name).read_text(), name


def test_ten_minute_config_trains_the_toy_pipeline_on_balanced_data():
    """examples/toy/nft_10min.yaml: the shipped toy pipeline, the balanced train split, the
    toy_geneval verifier, a training budget of at most 10 minutes."""
    from pathlib import Path

    from shared.config import load_config

    root = Path(__file__).parents[2]
    cfg = load_config(root / "examples" / "toy" / "nft_10min.yaml")
    assert cfg.model.model_type == "sd3-5" and cfg.model.model_name_or_path == "assets/toy-sd3"
    assert cfg.data.dataset_dir == "examples/data/toy-balanced"
    assert [r.reward_model for r in cfg.rewards] == ["toy_geneval"]
    assert cfg.train.max_train_seconds is not None and cfg.train.max_train_seconds <= 600
    assert cfg.train.lr_schedule_clock == "budget"  # the cosine ends inside the budget on any machine
    cfg.geometry(1)
    # it is what `make demo` trains
    demo = [line for line in (root / "Makefile").read_text().splitlines() if line.startswith("DEMO_CONFIG ?=")]
    assert demo == ["DEMO_CONFIG ?= examples/toy/nft_10min.yaml"]
