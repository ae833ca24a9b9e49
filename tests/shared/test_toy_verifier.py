"""Toy world verifier (shared.toy.verify) and the ``toy_geneval`` reward."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from shared.rewards import REWARDS, build_reward, score_all
from shared.toy import (
    BACKGROUND,
    COLORS,
    CATEGORIES,
    IMAGE_SIZE,
    Obj,
    Scene,
    all_prompts,
    detect,
    parse_prompt,
    prompt_text,
    render,
    sample_scene,
    verify,
)
from shared.toy.verify import shape_quality

SEEDS_PER_CATEGORY = 120


def degrade(image, seed, sigma=0.6, noise=6.0):
    """Gaussian blur (``sigma`` px) plus Gaussian noise (std ``noise`` on the uint8 scale)."""
    blurred = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
    noisy = blurred + np.random.default_rng(seed).normal(0.0, noise, blurred.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def scenes(category, n=SEEDS_PER_CATEGORY):
    """``n`` (prompt, scene) pairs of ``category``, cycling over its prompts, seeds 0..n-1."""
    specs = [s for s in all_prompts() if s.category == category]
    for seed in range(n):
        spec = specs[(seed * 7) % len(specs)]
        yield prompt_text(spec), sample_scene(spec, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def accuracy():
    """Per category: (fraction of clean renders scoring 1.0, fraction of degraded ones)."""
    out = {}
    for category in CATEGORIES:
        clean = noisy = 0
        for seed, (prompt, scene) in enumerate(scenes(category)):
            image = render(scene)
            clean += verify(image, prompt).score == 1.0
            noisy += verify(degrade(image, seed), prompt).correct
        out[category] = (clean / SEEDS_PER_CATEGORY, noisy / SEEDS_PER_CATEGORY)
    return out


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_scenes_verify(accuracy, category):
    clean, noisy = accuracy[category]
    assert clean >= 0.99, f"{category}: {clean:.1%} of {SEEDS_PER_CATEGORY} clean renders fully correct"
    assert noisy >= 0.95, f"{category}: {noisy:.1%} of {SEEDS_PER_CATEGORY} blurred+noisy renders fully correct"


def test_detect_reports_shapes_colours_and_centres():
    scene = Scene(
        [
            Obj("circle", "red", 15.0, 15.0, 14.0),
            Obj("square", "blue", 45.0, 20.0, 12.0),
            Obj("triangle", "yellow", 30.0, 48.0, 16.0),
        ]
    )
    found = sorted(detect(render(scene)), key=lambda d: d.shape)
    assert [(d.shape, d.color) for d in found] == [("circle", "red"), ("square", "blue"), ("triangle", "yellow")]
    for d, o in zip(found, scene.objects):
        assert abs(d.cx - o.cx) < 1.0
    assert abs(found[1].cy - 20.0) < 1.0 and found[1].area == 144
    assert detect(render(Scene([]))) == []


def test_empty_image_scores_zero_for_every_category():
    empty = render(Scene([]))
    for spec in all_prompts()[::5]:  # every category, many prompts
        assert verify(empty, prompt_text(spec)).score == 0.0, prompt_text(spec)


def grid_scene(k, shape="square"):
    """``k`` (<= 9) objects of ``shape`` of size 12 on a 3 x 3 grid of pitch 20 px."""
    cells = [(12 + 20 * (i % 3), 12 + 20 * (i // 3)) for i in range(k)]
    return Scene([Obj(shape, "green", float(x), float(y), 12.0) for x, y in cells])


def test_wrong_count():
    for n in (1, 2, 3, 4):
        prompt = f"a photo of {['one', 'two', 'three', 'four'][n - 1]} {'square' if n == 1 else 'squares'}"
        assert verify(render(grid_scene(n)), prompt).correct
        for wrong in (n - 1, n + 1):
            verdict = verify(render(grid_scene(wrong)), prompt)
            assert verdict.score < 1.0 and not verdict.checks[f"count square == {n}"], (prompt, wrong)
    # n - 1 / n + 1 objects of a sampled scene
    scene = sample_scene("a photo of three circles", np.random.default_rng(4))
    scene.objects.pop()
    assert not verify(render(scene), "a photo of three circles").correct
    assert verify(render(scene), "a photo of two circles").correct


def test_wrong_colour():
    image = render(sample_scene("a photo of a blue circle", np.random.default_rng(0)))
    verdict = verify(image, "a photo of a red circle")
    assert verdict.checks == {"has circle": True, "circle is red": False} and verdict.score == 0.5
    image = render(sample_scene("a photo of a blue square and a red circle", np.random.default_rng(0)))
    verdict = verify(image, "a photo of a red square and a blue circle")  # colours swapped
    assert verdict.score == 0.5 and not verdict.correct


def test_wrong_side():
    for seed, prompt in enumerate(
        ["a photo of a circle left of a square", "a photo of a triangle above a circle", "a photo of a square below a triangle"]
    ):
        scene = sample_scene(prompt, np.random.default_rng(seed))
        assert verify(render(scene), prompt).correct
        a, b = scene.objects
        a.cx, a.cy, b.cx, b.cy = b.cx, b.cy, a.cx, a.cy  # swap places
        verdict = verify(render(scene), prompt)
        assert verdict.score == pytest.approx(2 / 3) and not verdict.correct


def test_missing_object():
    scene = sample_scene("a photo of a circle and a triangle", np.random.default_rng(1))
    scene.objects = [o for o in scene.objects if o.shape != "triangle"]
    verdict = verify(render(scene), "a photo of a circle and a triangle")
    assert verdict.checks == {"has circle": True, "has triangle": False}
    scene = sample_scene("a photo of a red square and a blue circle", np.random.default_rng(1))
    scene.objects = scene.objects[:1]
    assert verify(render(scene), "a photo of a red square and a blue circle").score == 0.5


def test_extra_objects_only_matter_for_counting():
    scene = Scene([Obj("circle", "red", 15, 15, 12), Obj("square", "green", 45, 45, 12), Obj("triangle", "blue", 15, 45, 12)])
    image = render(scene)
    assert verify(image, "a photo of a circle").correct
    assert verify(image, "a photo of a red circle and a green square").correct
    assert verify(image, "a photo of one circle").correct
    scene.objects.append(Obj("circle", "cyan", 45, 15, 12))
    assert not verify(render(scene), "a photo of one circle").correct


def test_exact_objects_counts_every_detection():
    scene = Scene([Obj("circle", "red", 15, 15, 12), Obj("square", "green", 45, 45, 12)])
    image = render(scene)
    verdict = verify(image, "a photo of a red circle and a green square", exact_objects=True)
    assert verdict.correct and verdict.checks["2 objects"]
    scene.objects.append(Obj("triangle", "blue", 15, 45, 12))  # an extra object
    image = render(scene)
    assert verify(image, "a photo of a red circle and a green square").correct
    verdict = verify(image, "a photo of a red circle and a green square", exact_objects=True)
    assert not verdict.correct and verdict.checks == {
        "has circle": True, "has square": True, "circle is red": True, "square is green": True, "2 objects": False}
    assert verify(image, "a photo of a circle", exact_objects=True).score == 0.5  # "1 object" fails
    assert verify(image, "a photo of three circles", exact_objects=True).checks["3 objects"]


def _superellipse_beside_a_circle(power):
    """A red circle at (16, 16) and a blue ``|x|^p + |y|^p <= 1`` blob of side 14 at (44, 44):
    p = 2 is a circle, larger p rounds towards a square (p = 3 is still classified a circle)."""
    image = render(Scene([Obj("circle", "red", 16, 16, 14)]))
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    image[(np.abs(xs - 44) / 7) ** power + (np.abs(ys - 44) / 7) ** power <= 1] = COLORS["blue"]
    return image


def test_shape_likeness_is_a_softmax_of_template_ious():
    from shared.toy.verify import SHAPES, shape_likeness

    ious = {"circle": 0.85, "square": 0.80, "triangle": 0.60}
    z = sum(math.exp(ious[s] / 0.05) for s in SHAPES)
    for shape in SHAPES:
        assert shape_likeness(ious, shape) == pytest.approx(math.exp(ious[shape] / 0.05) / z)
    assert shape_likeness(dict.fromkeys(SHAPES, 0.7), "square") == pytest.approx(1 / 3)
    assert shape_likeness({}, "circle") == 0.0  # no IoUs (e.g. a detection built by hand)


def test_soft_shapes_ranks_a_near_miss_above_a_wrong_shape_and_changes_no_check():
    from shared.toy.verify import SOFT_SHAPE_CREDIT, shape_likeness

    prompt = "a photo of a circle and a square"
    scores = {}
    for power in (2.0, 3.0):
        image = _superellipse_beside_a_circle(power)
        hard, soft = verify(image, prompt), verify(image, prompt, soft_shapes=True)
        assert [d.shape for d in detect(image)] == ["circle", "circle"]  # the square is missing
        assert soft.checks == hard.checks == {"has circle": True, "has square": False}
        assert (soft.correct, soft.present) == (hard.correct, hard.present) == (False, False)
        assert hard.score == 0.5
        blob = [d for d in detect(image) if d.color == "blue"][0]
        assert soft.score == pytest.approx((1 + SOFT_SHAPE_CREDIT * shape_likeness(blob.ious, "square")) / 2)
        scores[power] = soft.score
    assert 0.5 < scores[2.0] < 0.51 < scores[3.0] < 0.5 + SOFT_SHAPE_CREDIT / 2
    # a drawn square passes its check whole, soft or not; a passing image scores 1
    image = _superellipse_beside_a_circle(6.0)
    assert verify(image, prompt).correct and verify(image, prompt, soft_shapes=True).score == 1.0


def test_soft_shapes_gives_nothing_for_clutter():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    verdict = verify(image, "a photo of a circle and a square", soft_shapes=True)
    assert verdict.score == verify(image, "a photo of a circle and a square").score == 0.0


def test_toy_geneval_soft_shapes_option():
    array = _superellipse_beside_a_circle(3.0)
    image = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    prompt = ["a photo of a circle and a square"]
    soft = build_reward("toy_geneval", soft_shapes=True, exact_objects=True)
    expected = verify(array, prompt[0], soft_shapes=True, exact_objects=True).score
    assert soft.score(image, prompt).item() == pytest.approx(expected)
    assert 2 / 3 < expected < 2 / 3 + 0.5 / 3  # "2 objects" passes, "has square" earns part
    assert soft.details(image, prompt)["accuracy/two_object"].item() == 0.0  # held-out metric: GenEval's
    with pytest.raises(ValueError, match="cannot both apply"):
        build_reward("toy_geneval", soft_shapes=True, strict=True)


def test_shape_quality_scores_clean_shapes_above_blurred_ones_and_nothing_for_no_scene():
    clean, blurred = [], []
    for category in CATEGORIES:
        for prompt, scene in scenes(category, n=4):
            image = render(scene)
            clean.append(shape_quality(image))
            soft = ndimage.gaussian_filter(image.astype(np.float32), sigma=(2.0, 2.0, 0))
            blurred.append(shape_quality(np.round(soft).astype(np.uint8)))
    assert min(clean) >= 0.96  # the verifier's measured clean-template IoU
    assert np.mean(blurred) < np.mean(clean) - 0.03
    assert sum(b < c for b, c in zip(blurred, clean)) >= 0.9 * len(clean)
    assert shape_quality(render(Scene([]))) == 0.0  # nothing drawn
    noise = np.random.default_rng(0).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    assert shape_quality(noise) == 0.0  # clutter is no scene


def test_toy_shape_quality_reward():
    images = [render(sample_scene("a photo of a red circle and a blue square", np.random.default_rng(0))),
              render(Scene([]))]
    reward = build_reward("toy_shape_quality")
    assert "toy_shape_quality" in REWARDS and reward.kind == "pointwise"
    scores = reward.score(to_tensor(images), ["a photo of a cat", "anything"])  # prompt-free
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([shape_quality(images[0]), 0.0])
    with pytest.raises(ValueError, match="RGB"):
        reward.score(torch.zeros(1, 1, 8, 8), ["x"])


def test_verify_rejects_bad_inputs():
    with pytest.raises(ValueError, match="a photo of a SHAPE"):
        verify(render(Scene([])), "a photo of a cat")
    with pytest.raises(ValueError, match="uint8"):
        verify(np.zeros((8, 8, 3), dtype=np.float32), "a photo of a circle")


# ----------------------------------------------------------------------------- reward


def to_tensor(images):
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def batch():
    prompts, images = [], []
    for category in CATEGORIES:
        for prompt, scene in scenes(category, n=2):
            prompts.append(prompt)
            images.append(render(scene))
    prompts.append("a photo of a red circle")  # wrong colour: half right
    images.append(render(sample_scene("a photo of a blue circle", np.random.default_rng(0))))
    return prompts, images


def test_reward_registered_and_built():
    assert "toy_geneval" in REWARDS
    reward = build_reward("toy_geneval")
    assert reward.kind == "pointwise" and reward.accepted_options() == ["device", "dtype", "exact_objects", "soft_shapes", "strict"]
    with pytest.raises(TypeError, match="strict"):
        build_reward("toy_geneval", strikt=True)


def test_reward_scores_and_strict(batch):
    prompts, images = batch
    scores = build_reward("toy_geneval").score(to_tensor(images), prompts)
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
    assert torch.all(scores[:-1] == 1.0) and scores[-1].item() == 0.5
    strict = build_reward("toy_geneval", strict=True).score(to_tensor(images), prompts)
    assert torch.all(strict[:-1] == 1.0) and strict[-1].item() == 0.0
    via_dispatch = score_all(build_reward("toy_geneval"), to_tensor(images), prompts, torch.arange(len(prompts)), 4)
    assert torch.equal(via_dispatch, scores)


def test_reward_exact_objects_scores_but_details_keep_genevals_rule():
    scene = Scene([Obj("circle", "red", 15, 15, 12), Obj("circle", "blue", 45, 45, 12)])
    images, prompts = to_tensor([render(scene)]), ["a photo of a red circle"]
    assert build_reward("toy_geneval").score(images, prompts).tolist() == [1.0]
    exact = build_reward("toy_geneval", exact_objects=True)
    assert exact.score(images, prompts).tolist() == [pytest.approx(2 / 3)]
    assert exact.details(images, prompts)["accuracy/per_image"].tolist() == [1.0]


def test_reward_details(batch):
    prompts, images = batch
    details = build_reward("toy_geneval").details(to_tensor(images), prompts)
    assert set(details) == ({"accuracy/per_image"} | {f"accuracy/{c}" for c in CATEGORIES}
                            | {f"present/{c}" for c in CATEGORIES})
    assert details["accuracy/per_image"].tolist() == [1.0] * (len(prompts) - 1) + [0.0]
    categories = [parse_prompt(p).category for p in prompts]
    for c in CATEGORIES:
        values = details[f"accuracy/{c}"]
        assert values.shape == (len(prompts),) and values.dtype == torch.float32
        for value, category, correct in zip(values.tolist(), categories, details["accuracy/per_image"].tolist()):
            assert (value == correct) if category == c else math.isnan(value)
        # every image draws its prompt's shapes (the last one in the wrong colour)
        for value, category in zip(details[f"present/{c}"].tolist(), categories):
            assert (value == 1.0) if category == c else math.isnan(value)


def test_reward_details_presence_separates_missing_objects_from_wrong_relations():
    """``present/{category}``: the named shapes are there (a reversed relation is present but
    wrong); a missing shape is neither."""
    prompt = "a photo of a circle left of a square"
    scene = sample_scene(prompt, np.random.default_rng(2))
    a, b = scene.objects
    swapped = Scene([Obj(a.shape, a.color, b.cx, a.cy, a.size), Obj(b.shape, b.color, a.cx, b.cy, b.size)])
    lone = Scene([a])
    details = build_reward("toy_geneval").details(to_tensor([render(scene), render(swapped), render(lone)]),
                                                  [prompt] * 3)
    assert details["accuracy/position"].tolist() == [1.0, 0.0, 0.0]
    assert details["present/position"].tolist() == [1.0, 1.0, 0.0]


def test_overall_accuracy_is_genevals_unweighted_mean_of_the_categories(batch):
    """GenEval's overall score: the mean of the six category accuracies, not of the images. The
    batch has 2 correct images in each category plus one wrong ``colors`` image (13 images):
    per image 12/13, per category five 1.0s and colors 2/3, so overall (5 + 2/3) / 6 = 17/18."""
    prompts, images = batch
    reward = build_reward("toy_geneval")
    details = reward.details(to_tensor(images), prompts)
    means = {k: float(torch.nanmean(v)) for k, v in details.items()}  # what evaluation reduces to
    assert means["accuracy/per_image"] == pytest.approx(12 / 13)
    assert means["accuracy/colors"] == pytest.approx(2 / 3)
    assert reward.summarize_details(means) == {"accuracy": pytest.approx(17 / 18)}
    # only the categories present count; none present, no overall score
    assert reward.summarize_details({"accuracy/counting": 0.5, "accuracy/position": 0.25,
                                     "accuracy/per_image": 0.9}) == {"accuracy": pytest.approx(0.375)}
    assert reward.summarize_details({}) == {}


def test_reward_works_at_128px():
    prompt = "a photo of a circle left of a square"
    scene = sample_scene(prompt, np.random.default_rng(2))
    big = render(scene, size=128)
    upscaled = np.kron(render(scene), np.ones((2, 2, 1), dtype=np.uint8))
    reward = build_reward("toy_geneval", strict=True)
    assert reward.score(to_tensor([big, upscaled]), [prompt, prompt]).tolist() == [1.0, 1.0]
    a, b = scene.objects
    a.cx, b.cx = b.cx, a.cx
    assert reward.score(to_tensor([render(scene, size=128)]), [prompt]).tolist() == [0.0]


def test_reward_rejects_non_toy_prompts():
    image = to_tensor([np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"toy_geneval only scores toy-world prompts.*'a photo of a cat'"):
        build_reward("toy_geneval").score(image, ["a photo of a cat"])


def _blob_l(image: np.ndarray, x: int, y: int, color) -> None:
    """An L of two 4-px bars (14 x 4 and 4 x 14): a component of no known shape."""
    image[y:y + 4, x:x + 14] = color
    image[y:y + 14, x:x + 4] = color


def test_clutter_is_not_read_as_a_scene():
    """A correct scene buried in larger unknown blobs fails every check (noise and scribbles pass
    GenEval's no-penalty-for-extras rule otherwise); one stray blob does not make clutter."""
    from shared.toy.verify import classify_shape

    prompt = "a photo of a red circle"
    scene = Scene([Obj("circle", "red", 14, 14, 8)])
    clean = render(scene)
    assert verify(clean, prompt).correct
    one = clean.copy()
    _blob_l(one, 40, 40, COLORS["blue"])
    assert [d.shape for d in detect(one) if d.color == "blue"] == ["unknown"]  # the blob is unknown
    l_mask = np.zeros((14, 14), dtype=bool)
    l_mask[:4, :], l_mask[:, :4] = True, True
    assert classify_shape(l_mask) == "unknown"
    assert verify(one, prompt).correct and not verify(one, prompt).clutter
    noisy = clean.copy()
    for x, y, c in ((40, 4, "blue"), (4, 40, "green"), (40, 40, "yellow")):
        _blob_l(noisy, x, y, COLORS[c])
    v = verify(noisy, prompt)
    assert v.clutter and not v.correct and v.score == 0.0 and not v.present
