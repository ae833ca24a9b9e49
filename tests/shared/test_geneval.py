"""``geneval``: GenEval's rule for positions and its clause check on hand-made detections (closed
forms), metadata validation, and the reward on tiny random Mask2Former + CLIP models loaded with
``from_pretrained`` (no hub)."""

from __future__ import annotations

import math

import pytest
import torch

from shared.rewards import build_reward, score_all
from shared.rewards.geneval import COLORS, GRAY, TAGS, Detection, GenEval, check_metadata, judge, relations

def box(cx: float, cy: float, w: float = 10, h: float = 10) -> tuple[float, float, float, float]:
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


@pytest.mark.parametrize("a, b, expected", [
    (box(10, 50), box(60, 50), {"left of"}),
    (box(60, 50), box(10, 50), {"right of"}),
    (box(50, 10), box(50, 60), {"above"}),  # y grows downward
    (box(50, 60), box(50, 10), {"below"}),
    (box(10, 10), box(60, 60), {"left of", "above"}),  # diagonal: both components -0.707
    (box(50, 50), box(50, 50), set()),  # same center
    (box(50, 50), box(53, 50), set()),  # offset 3 < 0.1 * (10 + 10): shrunk to nothing
    (box(10, 45), box(60, 50), {"left of"}),  # mostly sideways: dy = 3/50.2 is below 0.5
])
def test_relations_closed_forms(a, b, expected):
    assert relations(a, b) == expected


def test_relations_margin_shrinks_the_offset_per_axis():
    # offset (-5, 0), extents 10 + 10: shrunk by 0.1 * 20 = 2 -> dx = -3 / 5 = -0.6 < -0.5: left of
    assert relations(box(45, 50), box(50, 50)) == {"left of"}
    # with threshold 0.2 it shrinks by 4 -> dx = -1 / 5 = -0.2: no relation
    assert relations(box(45, 50), box(50, 50), threshold=0.2) == set()


def det(cx, cy, score=0.95):
    return Detection(box(cx, cy), score)


def never(name, d):  # a color_of that must not be called
    raise AssertionError("color_of called for an entry without a color")


def test_judge_counts_colors_positions_and_exclusions():
    one = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert judge(one, {"dog": [det(10, 10)]}, never).correct
    v = judge(one, {}, never)
    assert not v.correct and v.partial == 0.0 and v.clauses == [("1 dog", False)]

    counting = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
    three, four = [det(i * 20, 10) for i in range(3)], [det(i * 20, 10) for i in range(4)]
    assert judge(counting, {"cat": three}, never).correct
    v = judge(counting, {"cat": four}, never)  # too many: the include holds, the exclude does not
    assert v.clauses == [("3 cat", True), ("fewer than 4 cat", False)] and v.partial == 0.5
    assert judge(counting, {"cat": three[:2]}, never).partial == 0.0  # too few: the exclude needs the count met
    assert judge(counting, {}, never).partial == 0.0  # an empty image earns nothing on a counting row

    colors = {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"},
                                              {"class": "dog", "count": 1, "color": "blue"}]}
    bench, dog = det(10, 10), det(80, 10)
    painted = {bench: "red", dog: "green"}
    v = judge(colors, {"bench": [bench], "dog": [dog]}, lambda n, d: painted[d])
    assert v.clauses == [("1 bench", True), ("red bench", True), ("1 dog", True), ("blue dog", False)]
    assert v.partial == 0.75 and not v.correct
    # a missing object fails its color clause without asking for a color
    assert judge(colors, {"bench": [bench]}, lambda n, d: painted[d]).partial == 0.5

    position = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                              {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    assert judge(position, {"bench": [det(10, 50)], "dog": [det(80, 50)]}, never).correct
    v = judge(position, {"bench": [det(80, 50)], "dog": [det(10, 50)]}, never)
    assert v.clauses[-1] == ("dog right of bench", False) and v.partial == pytest.approx(2 / 3)
    # the reference did not match: the relation cannot hold
    v = judge(position, {"dog": [det(80, 50)]}, never)
    assert v.clauses == [("1 bench", False), ("1 dog", True), ("dog right of bench", False)]


def test_only_the_best_count_objects_are_checked_for_color():
    meta = {"include": [{"class": "cat", "count": 2, "color": "black"}]}
    cats = [det(10, 10, 0.99), det(30, 10, 0.98), det(50, 10, 0.97)]
    colors = {cats[0]: "black", cats[1]: "white", cats[2]: "black"}
    assert not judge(meta, {"cat": cats}, lambda n, d: colors[d]).correct  # the third is not looked at


@pytest.mark.parametrize("meta, message", [
    ({}, "has no GenEval 'include' list"),
    ({"include": [{"count": 1}]}, "must be an object with a 'class' name"),
    ({"include": [{"class": "dog", "count": 0}]}, "'count' must be an integer >= 1"),
    ({"include": [{"class": "dog", "color": "teal"}]}, "color 'teal' is not one of GenEval's"),
    ({"include": [{"class": "dog", "position": ["right of", 0]}]}, "an earlier include entry"),
    ({"include": [{"class": "dog"}], "exclude": [{"class": "dog", "count": "2"}]}, "exclude\\[0\\]: 'count'"),
])
def test_bad_metadata_names_the_row_and_the_fix(meta, message):
    with pytest.raises(ValueError, match=message):
        check_metadata(meta, "the row of prompt 'x'")


# --- the reward on tiny models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tests.helpers.tiny_clip import save_tiny_clip
    from tests.helpers.tiny_detector import save_tiny_detector

    root = tmp_path_factory.mktemp("geneval")
    save_tiny_detector(root / "detector")
    save_tiny_clip(root / "clip")
    return root


def test_the_reward_loads_with_from_pretrained_and_scores_rows(tiny_models):
    reward = build_reward("geneval", detector=str(tiny_models / "detector"), clip_model=str(tiny_models / "clip"),
                          threshold=0.0, counting_threshold=0.0, detector_size=64)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    metadata = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
                {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                                  {"class": "computer mouse", "count": 1, "color": "blue"}]},
                {"tag": "position", "include": [{"class": "bench", "count": 1},
                                                {"class": "person", "count": 1, "position": ["left of", 0]}]}]
    prompts = ["a dog", "a red dog and a blue computer mouse", "a person left of a bench"]
    colored = []
    color = reward.color
    reward.color = lambda image, name, d: colored.append(name) or color(image, name, d)
    scores = score_all(reward, images, prompts, torch.arange(3), batch_size=2, metadata=metadata)
    assert colored == ["dog"]  # the random detector finds a dog in image 1 (threshold 0): its color is asked
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    # the same image and row score the same alone, and the partial score is a fraction of its clauses
    again = reward.score(images[1:2], prompts[1:2], metadata=metadata[1:2])
    assert again.item() == pytest.approx(scores[1].item())
    assert scores[1].item() * 4 == pytest.approx(round(scores[1].item() * 4))
    strict = build_reward("geneval", detector=str(tiny_models / "detector"), clip_model=str(tiny_models / "clip"),
                          threshold=0.0, strict=True, detector_size=64)
    correct = strict.score(images, prompts, metadata=metadata)
    assert set(correct.tolist()) <= {0.0, 1.0} and (correct <= scores + 1e-6).all()
    details = strict.details(images, prompts, metadata=metadata)
    # every GenEval tag, present or not (the same keys on every process of an evaluation)
    assert set(details) == {"correct"} | {f"correct/{t}" for t in TAGS}
    torch.testing.assert_close(details["correct"], correct)
    assert math.isnan(details["correct/position"][0]) and not math.isnan(details["correct/position"][2])
    assert torch.isnan(details["correct/counting"]).all()
    assert strict.summarize_details({"correct": 0.5, "correct/a": 1.0, "correct/b": 0.0}) == {"overall": 0.5}


def test_unknown_classes_and_rows_without_metadata_teach_the_fix(tiny_models):
    reward = build_reward("geneval", detector=str(tiny_models / "detector"), clip_model=str(tiny_models / "clip"),
                          detector_size=64)
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"class 'giraffe'.*not a label of the detector.*class_aliases"):
        reward.score(images, ["a giraffe"], metadata=[{"include": [{"class": "giraffe"}]}])
    with pytest.raises(ValueError, match=r"prompt 'a giraffe'.*no GenEval 'include'.*rewards\[\]\.datasets"):
        score_all(reward, images, ["a giraffe"], torch.arange(1), batch_size=1)  # no metadata at all
    aliased = build_reward("geneval", detector=str(tiny_models / "detector"), clip_model=str(tiny_models / "clip"),
                           class_aliases={"giraffe": "dog"}, detector_size=64)
    assert aliased.score(images, ["a giraffe"], metadata=[{"include": [{"class": "giraffe"}]}]).shape == (1,)
    with pytest.raises(FileNotFoundError, match="detector"):
        build_reward("geneval", detector=str(tiny_models / "missing" / "x"), clip_model=str(tiny_models / "clip"))


def test_detections_map_labels_take_boxes_from_masks_best_first_and_drop_empty_masks():
    reward = GenEval.__new__(GenEval)  # only the post-processing step, no models
    reward.labels = {0: "person", 1: "dog"}
    maps = torch.zeros(3, 8, 10)
    maps[0, 2:5, 1:4] = 1  # a dog at x 1..3, y 2..4
    maps[1, 0:8, 6:10] = 1  # a better dog at the right edge
    result = {"segmentation": maps, "segments_info": [{"label_id": 1, "score": 0.5}, {"label_id": 1, "score": 0.9},
                                                      {"label_id": 0, "score": 0.99}]}  # the person's mask is empty
    found = reward._detections(result)
    assert set(found) == {"dog"}
    assert [d.score for d in found["dog"]] == [0.9, 0.5]
    assert found["dog"][0].box == (6.0, 0.0, 10.0, 8.0) and found["dog"][1].box == (1.0, 2.0, 4.0, 5.0)
    assert reward._detections({"segmentation": torch.full((4, 4), -1.0), "segments_info": []}) == {}


def test_color_classifies_the_box_crop_with_the_background_grayed(tiny_models):
    reward = build_reward("geneval", detector=str(tiny_models / "detector"), clip_model=str(tiny_models / "clip"),
                          detector_size=64)
    image = torch.zeros(3, 16, 16)
    image[0] = 1.0  # all red
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 2:6] = True
    seen = []
    transform = reward.clip.transform
    reward.clip.transform = lambda x: seen.append(x.clone()) or transform(x)
    assert reward.color(image, "dog", Detection((2.0, 3.0, 6.0, 9.0), 0.9, mask)) in COLORS
    crop = seen[0][0]
    assert crop.shape == (3, 6, 4)  # rows 3..8, columns 2..5
    assert torch.equal(crop[:, 1:5, :], image[:, 4:8, 2:6])  # inside the mask: the pixels
    assert (crop[:, 0] == GRAY).all() and (crop[:, 5] == GRAY).all()  # outside: #999 gray
    assert reward._color_text["dog"].shape[0] == len(COLORS)  # one (template-averaged) embedding per color


def test_rows_naming_a_class_the_detector_does_not_know_fail_at_load(tiny_models):
    detector = str(tiny_models / "detector")
    row = {"tag": "single_object", "include": [{"class": "giraffe", "count": 1}]}
    assert "class 'giraffe' is not a label of the detector" in GenEval.row_problem(row, {"detector": detector})
    assert GenEval.row_problem(row, {"detector": detector, "class_aliases": {"giraffe": "dog"}}) is None
    assert GenEval.row_problem({"include": [{"class": "computer mouse"}]}, {"detector": detector}) is None  # alias
    # a detector whose config cannot be read here: only the row's shape is checked
    assert GenEval.row_problem(row, {"detector": str(tiny_models / "nowhere")}) is None
    assert "no GenEval 'include'" in GenEval.row_problem({}, {})


def test_details_after_score_reuse_the_verdicts_instead_of_detecting_again(tiny_models):
    reward = build_reward("geneval", detector=str(tiny_models / "detector"), clip_model=str(tiny_models / "clip"),
                          threshold=0.0, detector_size=64)
    calls = []
    detect = reward.detect
    reward.detect = lambda images: calls.append(images.shape[0]) or detect(images)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    meta = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}] * 4
    scores = score_all(reward, images, ["a dog"] * 4, torch.arange(4), batch_size=2, metadata=meta)
    details = reward.details(images, ["a dog"] * 4, metadata=meta)
    assert calls == [2, 2]  # the details came from the verdicts of the scoring calls
    assert torch.equal(details["correct"], (scores == 1).float())
    images[0] = 1 - images[0]  # another image (or prompt, or row) is judged afresh
    reward.details(images, ["a dog"] * 4, metadata=meta)
    assert calls == [2, 2, 1]


def test_one_call_with_more_images_than_the_cache_holds(tiny_models, monkeypatch):
    import shared.rewards.geneval as g

    monkeypatch.setattr(g, "SEEN_MAX", 2)
    reward = build_reward("geneval", detector=str(tiny_models / "detector"), clip_model=str(tiny_models / "clip"),
                          threshold=0.0, detector_size=64)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    meta = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}] * 5
    assert reward.score(images, ["a dog"] * 5, metadata=meta).shape == (5,)
    assert len(reward._seen) == 2
